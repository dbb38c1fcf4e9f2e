"""Structured output and tools at the Triton door: the `response_format` and `tools` inputs, `sampling_parameters`
as vllm_backend clients send it, the gateway's encoding, and both doors giving the same answer on real Triton."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openai
import pytest
from pydantic import BaseModel, Field

from agent.config import load_settings
from agent.engine.errors import InvalidRequestError
from agent.engine.limits import RequestLimits
from agent.engine.structured.schema import SchemaLimits, response_format_constraint
from agent.engine.types import GenerationRequest, Message, OutputConstraint, SamplingParams, ToolCall
from agent.serving.model_server import create_app
from agent.serving.triton import protocol as proto
from agent.serving.triton.gateway import TritonGatewayEngine
from tests.serving import live
from tests.serving.triton import triton_fixtures
from tests.serving.triton.triton_fixtures import MODEL, RunningTriton

triton_smollm = triton_fixtures.triton_smollm  # the session's shared server (see triton_fixtures)
LIMITS = RequestLimits()
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "rank": {"type": "integer", "minimum": 1}},
    "required": ["city", "rank"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def getter(**values: object):
    tensors = {k: (v if isinstance(v, np.ndarray) else np.array([v], dtype=np.object_)) for k, v in values.items()}
    return tensors.get


def test_response_format_input_gives_the_fastapi_doors_constraint() -> None:
    decoded = proto.decode_request(getter(text_input="hi", response_format=json.dumps(RESPONSE_FORMAT)), LIMITS)
    assert decoded.request.sampling.constraint == response_format_constraint(RESPONSE_FORMAT, SchemaLimits())
    plain = proto.decode_request(getter(text_input="hi"), LIMITS)
    assert plain.request.sampling.constraint is None


@pytest.mark.parametrize(
    "parameters",
    [
        {"structured_outputs": {"json": CITY}},
        {"guided_decoding": {"json": json.dumps(CITY)}},
        {"response_format": RESPONSE_FORMAT},
    ],
)
def test_sampling_parameters_carry_the_constraint(parameters: dict) -> None:
    decoded = proto.decode_request(getter(text_input="hi", sampling_parameters=json.dumps(parameters)), LIMITS)
    assert decoded.request.sampling.constraint == response_format_constraint(RESPONSE_FORMAT, SchemaLimits())
    json_object = json.dumps({"structured_outputs": {"json_object": True}, "max_tokens": "8"})
    decoded = proto.decode_request(getter(text_input="hi", sampling_parameters=json_object), LIMITS)
    assert decoded.request.sampling.constraint == OutputConstraint("json_object")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"response_format": "{nope"}, "response_format: expected a JSON object"),
        ({"response_format": json.dumps({"type": "yaml"})}, "'yaml' is not supported"),
        ({"sampling_parameters": json.dumps({"structured_outputs": {"regex": "a+"}})}, "only `json`"),
        ({"sampling_parameters": json.dumps({"structured_outputs": {"json": {"not": {}}}})}, "'not'"),
        ({"tools": json.dumps([{"type": "retrieval"}])}, "tools[0]"),
    ],
)
def test_bad_constraints_are_400s(values: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        proto.decode_request(getter(text_input="hi", **values), LIMITS)
    assert message in err.value.message and err.value.status == 400


def test_gateway_encoding_round_trips_constraint_tools_and_tool_messages() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Oslo"}')
    request = GenerationRequest(
        messages=(
            Message.text("user", "Weather?"),
            Message(role="assistant", parts=(), tool_calls=(call,)),
            Message(role="tool", parts=Message.text("tool", "sunny").parts, tool_call_id="call_1"),
            Message.text("user", "And so?"),
        ),
        sampling=SamplingParams(
            max_new_tokens=8, constraint=response_format_constraint(RESPONSE_FORMAT, SchemaLimits())
        ),
        tools=({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},),
    )
    tensors = proto.encode_request(request, stream=True)
    decoded = proto.decode_request(tensors.get, LIMITS).request
    assert decoded.messages == request.messages
    assert decoded.sampling.constraint == request.sampling.constraint and decoded.tools == request.tools


class City(BaseModel):
    city: str = Field(max_length=12)
    rank: int = Field(ge=1)


@pytest.mark.slow
@pytest.mark.triton
async def test_both_doors_give_the_same_constrained_answer(triton_smollm: RunningTriton, tmp_path: Path) -> None:
    """Triton directly (HTTP generate, the response_format input), and FastAPI in gateway mode with the openai
    client's `parse`: the same greedy JSON."""
    prompt = "Name the largest city of Norway as JSON."
    status, raw = triton_smollm.post(
        f"/v2/models/{MODEL}/generate",
        {"text_input": prompt, "max_tokens": 40, "temperature": 0.0, "response_format": json.dumps(RESPONSE_FORMAT)},
    )
    assert status == 200, raw
    direct = json.loads(raw)
    assert direct["finish_reason"] == "stop"
    City.model_validate_json(direct["text_output"])

    settings = load_settings(
        loading_strategy="triton",
        triton_grpc_url=triton_smollm.grpc_url,
        triton_http_url=triton_smollm.http_url,
        triton_metrics_port=triton_smollm.server.cfg.metrics_port,
        history_db=tmp_path / "h.sqlite3",
    )
    engine = TritonGatewayEngine.from_settings(settings)
    await engine.start()
    try:
        async with live.serving(create_app(settings, engine)) as url:  # noqa: SIM117 (the client needs the url)
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120) as client:
                parsed = await client.chat.completions.parse(
                    model=engine.info().model_name,
                    messages=[{"role": "user", "content": prompt}],
                    response_format=City,
                    max_tokens=40,
                    temperature=0.0,
                )
                forced = await client.chat.completions.create(
                    model=engine.info().model_name,
                    messages=[{"role": "user", "content": "Weather in Oslo?"}],
                    tools=[WEATHER],
                    tool_choice={"type": "function", "function": {"name": "get_weather"}},
                    max_tokens=30,
                    temperature=0.0,
                )
    finally:
        await engine.shutdown()
    # pydantic's schema has titles the hand-written one has not: compare the parsed objects' shape, and the text
    # for the identical schema below
    assert isinstance(parsed.choices[0].message.parsed, City)
    call = forced.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    status, raw = triton_smollm.post(
        f"/v2/models/{MODEL}/generate",
        {
            "text_input": "Weather in Oslo?",
            "max_tokens": 30,
            "temperature": 0.0,
            "tools": json.dumps([WEATHER]),
            "sampling_parameters": json.dumps({"structured_outputs": {"json": WEATHER["function"]["parameters"]}}),
        },
    )
    assert status == 200 and json.loads(raw)["text_output"] == call.function.arguments  # same answer, both doors
