"""`response_format` / `tools` / `tool_choice` on /v1/chat/completions (agent.serving.api.openai_structured), with
FakeEngine, which echoes the last user message word by word: a message holding a `<tool_call>` block makes the
"model" answer with one, so "auto" tool calls are read back exactly, plain and streamed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from agent.engine.errors import InvalidRequestError
from agent.engine.fake import FakeEngine
from agent.engine.structured.schema import SchemaLimits
from agent.engine.types import GenerationChunk, OutputConstraint
from agent.serving.api.openai_structured import ToolPlan, answer_deltas, plan_request
from tests.serving.test_routes_openai import client_for

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
CALL = '<tool_call> {"name": "get_weather", "arguments": {"city": "Oslo"}} </tool_call>'


async def test_auto_tool_call_read_back_plain_and_streamed(tmp_path: Path) -> None:
    engine = FakeEngine(model_name="fake-model")
    async with client_for(tmp_path, engine) as http:
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="unused", http_client=http)
        messages = [{"role": "user", "content": f"Checking. {CALL}"}]
        plain = await client.chat.completions.create(model="fake-model", messages=messages, tools=[WEATHER])
        choice = plain.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "echo: Checking."
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
        assert engine.last_request.tools[0]["function"]["name"] == "get_weather"  # rendered in the prompt

        content, calls, finish = "", {}, None
        stream = await client.chat.completions.create(
            model="fake-model", messages=messages, tools=[WEATHER], stream=True
        )
        async for chunk in stream:
            delta = chunk.choices[0].delta
            assert "<tool" not in (delta.content or "")  # held back, never sent as text
            content += delta.content or ""
            for d in delta.tool_calls or []:
                calls.setdefault(d.index, {"name": "", "arguments": ""})
                calls[d.index]["name"] += d.function.name or ""
                calls[d.index]["arguments"] += d.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert content == "echo: Checking." and finish == "tool_calls"
        assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}

        # tool_choice "none": tools stay out of the prompt and the text is the answer, as written
        none = await client.chat.completions.create(
            model="fake-model", messages=messages, tools=[WEATHER], tool_choice="none"
        )
        assert none.choices[0].message.content.endswith("</tool_call>") and not none.choices[0].message.tool_calls
        assert engine.last_request.tools == ()


async def test_text_that_only_looks_like_a_call_is_streamed_as_text(tmp_path: Path) -> None:
    async with client_for(tmp_path) as http:
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="unused", http_client=http)
        messages = [{"role": "user", "content": "a <tool_ b <tool_call> {not json} </tool_call>"}]
        text = ""
        async for chunk in await client.chat.completions.create(
            model="fake-model", messages=messages, tools=[WEATHER], stream=True
        ):
            text += chunk.choices[0].delta.content or ""
            assert not chunk.choices[0].delta.tool_calls
    assert text == "echo: a <tool_ b <tool_call> {not json} </tool_call>"


async def test_constraints_reach_the_engine(tmp_path: Path) -> None:
    engine = FakeEngine(model_name="fake-model")
    async with client_for(tmp_path, engine) as http:
        body = {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        assert engine.last_request.sampling.constraint == OutputConstraint("json_object")
        forced = {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
        answer = await http.post("/v1/chat/completions", json=forced)
        constraint = engine.last_request.sampling.constraint
        assert constraint.kind == "json_schema" and json.loads(constraint.schema) == WEATHER["function"]["parameters"]
        # the fake's echo is not JSON: the forced call cannot be read, the text comes back as it is
        assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tool_choice": "required"}, "tool_choice: needs `tools`"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}}, "'not'"),
        ({"response_format": {"type": "regex"}}, "'regex' is not supported"),
    ],
)
async def test_bad_structured_requests_are_400s(tmp_path: Path, body: dict, message: str) -> None:
    async with client_for(tmp_path) as http:
        response = await http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], **body}
        )
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


async def _chunks(*texts: str) -> AsyncIterator[GenerationChunk]:
    for i, text in enumerate(texts, start=1):
        yield GenerationChunk("r", text, 3, i, "stop" if i == len(texts) else None)


async def test_partial_opener_is_held_until_known() -> None:
    plan = ToolPlan(tools=(WEATHER,), choice="auto")
    pieces = [d async for d in answer_deltas(_chunks("Hi <", "tool", "_x> there"), plan)]
    assert pieces[0].content == "" and pieces[0].chunk.completion_tokens == 1  # the stream starts at once
    assert pieces[1].content == "Hi"  # the "<" waits: it may begin <tool_call> (and the space before it)
    assert "".join(p.content for p in pieces) == "Hi <tool_x> there" and pieces[-1].finish_reason == "stop"
    assert not any(p.tool_calls for p in pieces)


def test_plan_without_tools_and_limits() -> None:
    constraint, plan = plan_request({"type": "json_object"}, None, None, True, SchemaLimits())
    assert constraint == OutputConstraint("json_object") and not plan.active
    with pytest.raises(InvalidRequestError, match=r"tools\[0\].function.parameters: larger than MAX_SCHEMA_BYTES=32"):
        plan_request(None, [WEATHER], "auto", True, SchemaLimits(max_bytes=32))
