"""Tool calling helpers (agent.engine.structured.tools) and their rendering through real chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from agent.engine.errors import InvalidRequestError
from agent.engine.prompt import render_prompt
from agent.engine.structured import tools
from agent.engine.structured.schema import SchemaLimits
from agent.engine.types import Message, ToolCall

LIMITS = SchemaLimits()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CHECKED = tools.check_tools([WEATHER, TIME], LIMITS)


def test_check_tools_refuses_bad_definitions() -> None:
    for bad, message in [
        ([{"type": "retrieval"}], r"tools\[0\]: only"),
        ([{"type": "function", "function": {"name": "has space"}}], "function.name"),
        ([WEATHER, WEATHER], "defined twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}], "'not'"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            tools.check_tools(bad, LIMITS)
    assert CHECKED[1]["function"]["parameters"] == {"type": "object", "properties": {}}


def test_forced_constraints() -> None:
    named = tools.tool_constraint(CHECKED, {"type": "function", "function": {"name": "get_weather"}}, parallel=True,
                                  limits=LIMITS)  # fmt: skip
    assert named is not None and json.loads(named.schema) == WEATHER["function"]["parameters"]
    required = tools.tool_constraint(CHECKED, "required", parallel=False, limits=LIMITS)
    schema = json.loads(required.schema)
    jsonschema.validate([{"name": "get_time", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "parameters": {}}] * 2, schema)  # parallel_tool_calls: false
    assert tools.tool_constraint(CHECKED, "auto", parallel=True, limits=LIMITS) is None
    with pytest.raises(InvalidRequestError, match="not in tools"):
        tools.tool_constraint(CHECKED, {"type": "function", "function": {"name": "nope"}}, parallel=True, limits=LIMITS)


def test_reading_answers() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    (call,) = tools.forced_calls('{"city":"Paris"}', named, CHECKED)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    calls = tools.forced_calls('[{"name":"get_time","parameters":{}}]', "required", CHECKED)
    assert [c.name for c in calls] == ["get_time"]
    assert tools.forced_calls('{"city":"Pa', named, CHECKED) is None

    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = tools.parse_tool_calls(text, CHECKED, parallel=True)
    assert content == "Let me check." and calls[0].name == "get_weather"
    two = text + '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert len(tools.parse_tool_calls(two, CHECKED, parallel=True)[1]) == 2
    assert len(tools.parse_tool_calls(two, CHECKED, parallel=False)[1]) == 1
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert tools.parse_tool_calls(unknown, CHECKED, parallel=True) == (unknown, [])
    assert tools.may_be_tool_call("  <tool_") and not tools.may_be_tool_call("Hello")


def conversation() -> tuple[Message, ...]:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    return (
        Message.text("user", "Weather in Paris?"),
        Message(role="assistant", parts=(), tool_calls=(call,)),
        Message(role="tool", parts=Message.text("tool", "21 C, sunny").parts, tool_call_id="call_1"),
    )


def test_generic_format_for_a_template_without_tools(smollm_folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_folder)
    assert not tools.template_supports_tools(tokenizer)
    prompt = render_prompt(tokenizer, conversation(), vision=False, tools=CHECKED)
    assert prompt.startswith("<|im_start|>system\n# Tools") and json.dumps(CHECKED[0]) in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # without tools the prompt is exactly what it was before tool support
    plain = (Message.text("user", "hi"),)
    assert render_prompt(tokenizer, plain, vision=False) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_native_template_gets_tools_and_tool_messages(smollm_folder: Path) -> None:
    """A template that knows tools (Qwen-style) receives `tools=`, `tool_calls` and role `tool` as HF expects."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_folder)
    tokenizer.chat_template = (
        "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %}\n{% endfor %}"
    )
    assert tools.template_supports_tools(tokenizer)
    prompt = render_prompt(tokenizer, conversation(), vision=False, tools=CHECKED)
    assert prompt.startswith("TOOL get_weather\nTOOL get_time\n")
    assert "assistant: CALL get_weather Paris" in prompt and "tool: 21 C, sunny (call_1)" in prompt
