"""Structured output and tool calling through the FastAPI door on the real SmolLM2 (transformers engine), driven by
the official `openai` client: `parse` with a pydantic model, forced tool calls, a tool round trip (plain and
streamed), and hostile schemas answered with 400 without holding up other requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from agent.config import load_settings
from agent.engine.base import Engine
from agent.engine.structured.grammar import GrammarLimits
from agent.engine.types import Message, ToolCall
from agent.serving.model_server import create_app
from tests.serving import live

pytestmark = pytest.mark.slow

N = 50  # requests per batch of checks (sent concurrently: the engine batches them)


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    likes_python: bool


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}},
    },
}


@contextlib.asynccontextmanager
async def openai_client(engine: Engine, tmp_path: Path, **settings: object) -> AsyncIterator[openai.AsyncOpenAI]:
    app = create_app(load_settings(history_db=tmp_path / "h.sqlite3", **settings), engine)
    async with live.serving(app) as url:  # noqa: SIM117 (the client needs the server's url)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0) as client:
            yield client


async def test_parse_returns_a_pydantic_object_for_50_prompts(smollm_engine: Engine, tmp_path: Path) -> None:
    async with openai_client(smollm_engine, tmp_path) as client:

        async def ask(i: int) -> Person | None:
            completion = await client.chat.completions.parse(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": f"Invent person number {i} and describe them as JSON."}],
                response_format=Person,
                max_tokens=48,
                temperature=0.0 if i % 2 else 0.8,
                seed=i,
            )
            return completion.choices[0].message.parsed

        people = await asyncio.gather(*[ask(i) for i in range(N)])
    assert all(isinstance(p, Person) for p in people)
    assert len({p.name for p in people if p}) > 1  # the prompts differ: so do (some of) the answers


async def test_forced_tool_calls_match_the_schema_50_of_50(smollm_engine: Engine, tmp_path: Path) -> None:
    schema = WEATHER["function"]["parameters"]
    async with openai_client(smollm_engine, tmp_path) as client:

        async def ask(i: int):
            return await client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": f"What is the weather in city number {i}?"}],
                tools=[WEATHER, TIME],
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                max_tokens=40,
                temperature=0.7,
                seed=i,
            )

        completions = await asyncio.gather(*[ask(i) for i in range(N)])
    for completion in completions:
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schema)


async def test_required_tool_choice_calls_one_of_the_tools(smollm_engine: Engine, tmp_path: Path) -> None:
    async with openai_client(smollm_engine, tmp_path) as client:
        completion = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What time is it in Paris?"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=60,
            temperature=0.0,
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


async def test_tool_round_trip_plain_and_streamed(smollm_engine: Engine, tmp_path: Path) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    async with openai_client(smollm_engine, tmp_path) as client:
        first = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[question],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
            temperature=0.0,
        )
        call = first.choices[0].message.tool_calls[0]
        follow_up = [
            question,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
        ]
        # tool_choice "none": a text answer (SmolLM2 would otherwise be free to call the tool again)
        answer = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=follow_up,
            tools=[WEATHER],
            tool_choice="none",
            max_tokens=30,
            temperature=0.0,
        )
        streamed_call = await _streamed_tool_call(client, question)
        text = ""
        async for chunk in await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=follow_up,
            tools=[WEATHER],
            tool_choice="none",
            max_tokens=30,
            temperature=0.0,
            stream=True,
        ):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    reply = answer.choices[0]
    assert reply.finish_reason in ("stop", "length") and reply.message.content and not reply.message.tool_calls
    assert text == reply.message.content  # streamed == plain (greedy)
    assert streamed_call == (call.function.name, call.function.arguments)
    # The tool's result reached the model through the generic tool format (SmolLM2's template has no tools).
    messages = (
        Message.text("user", question["content"]),
        Message(
            role="assistant", parts=(), tool_calls=(ToolCall(call.id, call.function.name, call.function.arguments),)
        ),
        Message(role="tool", parts=Message.text("tool", "sunny!").parts, tool_call_id=call.id),
    )
    prompt = smollm_engine.prompt_for(messages, (WEATHER,))
    assert "<tool_response>\nsunny!\n</tool_response>" in prompt and '"name": "get_weather"' in prompt
    assert "<tools>" in prompt


async def _streamed_tool_call(client: openai.AsyncOpenAI, question: dict) -> tuple[str, str]:
    """A forced call, streamed: OpenAI's tool-call deltas accumulated as a client does."""
    name, arguments, finish = "", "", None
    async for chunk in await client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[question],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0.0,
        stream=True,
    ):
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            name += delta.function.name or ""
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    return name, arguments


async def test_json_cut_short_by_max_tokens_is_length_with_the_text(smollm_engine: Engine, tmp_path: Path) -> None:
    async with openai_client(smollm_engine, tmp_path) as client:
        completion = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}},
            max_tokens=5,
            temperature=0.0,
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith('{"name":"')
    assert completion.usage.completion_tokens == 5


HOSTILE = [
    ({"type": "object", "not": {"required": ["a"]}}, "unsupported JSON Schema keyword 'not'"),
    ({"type": "string", "pattern": "(abc"}, "invalid regular expression"),
    ({"type": "string", "pattern": "(?=a)b"}, "lookaround"),
    ({"$ref": "#/$defs/missing"}, "cannot be compiled"),
    ({"enum": list(range(5000))}, "MAX_SCHEMA_ENUM=1000"),
    ({"type": "object", "description": "x" * 1_000_000}, "MAX_SCHEMA_BYTES"),
]


@pytest.mark.parametrize(("schema", "message"), HOSTILE, ids=["not", "regex", "lookaround", "ref", "enum", "1MB"])
async def test_hostile_schemas_are_400s(smollm_engine: Engine, tmp_path: Path, schema: dict, message: str) -> None:
    app = create_app(load_settings(history_db=tmp_path / "h.sqlite3", max_body_bytes=4 << 20), smollm_engine)
    async with live.serving(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            "max_tokens": 4,
        }
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


async def test_deep_and_recursive_schemas(smollm_engine: Engine, tmp_path: Path) -> None:
    deep: dict = {"type": "integer"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    tree = {
        "$defs": {
            "node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
        },
        "$ref": "#/$defs/node",
    }
    async with openai_client(smollm_engine, tmp_path) as client:
        with pytest.raises(openai.BadRequestError, match="MAX_SCHEMA_DEPTH=32"):
            await client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": "hi"}],
                response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": deep}},
            )
        recursive = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "A tree as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": tree}},
            max_tokens=24,
            temperature=0.0,
        )
    choice = recursive.choices[0]
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), tree)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


async def test_slow_compile_is_refused_and_does_not_block_others(
    smollm_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema whose grammar compiles slowly gets 400 at the timeout; a free request meanwhile is not delayed."""
    slow = {"enum": [f"value-number-{i}" for i in range(40_000)]}  # ~0.15 s to compile here: 15x the timeout below
    grammars = smollm_engine.grammar_cache()  # GRAMMAR_COMPILE_TIMEOUT_S is the engine's: shorten it here
    monkeypatch.setattr(grammars, "limits", GrammarLimits(cache_size=64, compile_timeout_s=0.01))
    async with openai_client(smollm_engine, tmp_path, max_schema_enum=50_000, max_schema_bytes=1 << 20) as client:
        body = {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "pick one"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": slow}},
            "max_tokens": 8,
        }

        async def hostile() -> float:
            started = time.monotonic()
            with pytest.raises(openai.BadRequestError, match="GRAMMAR_COMPILE_TIMEOUT_S=0.01"):
                await client.chat.completions.create(**body)
            return time.monotonic() - started

        async def free() -> float:
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await client.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            return time.monotonic() - started

        alone_started = time.monotonic()
        await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        alone = time.monotonic() - alone_started
        refused_after, beside = await asyncio.gather(hostile(), free())
        again = time.monotonic()
        with pytest.raises(openai.BadRequestError, match="GRAMMAR_COMPILE_TIMEOUT_S"):
            await client.chat.completions.create(**body)
        assert time.monotonic() - again < 0.5  # remembered as too slow: refused at once
    assert refused_after < 3.0
    assert beside < alone + 2.0  # the compile runs on its own threads: the free request is not queued behind it
