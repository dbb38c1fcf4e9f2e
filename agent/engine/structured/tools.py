"""Tool calling: tools in the prompt, the constraint a forced call needs, and tool calls read back from the text.

Prompt: a chat template that knows tools (Qwen3-VL's: it mentions `tools`) gets them as `tools=` and the messages'
`tool_calls` / role `tool` as Hugging Face templates expect. A template without them (SmolLM2's) gets the generic
format Qwen2.5 and Hermes models are trained on, written by `generic_tool_messages`:
- a system message listing the tools as JSON inside `<tools></tools>` and asking for
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` to call one (appended to the first system message);
- an assistant turn that called tools: its text, then one `<tool_call>` block per call;
- tool results: a user turn with one `<tool_response>...</tool_response>` block per result.

Output: with `tool_choice` "auto" the model may answer with `<tool_call>` blocks (`parse_tool_calls`); with
"required" or a named function the answer is constrained, as vLLM's OpenAI server does it, to JSON: a named function's
arguments (its `parameters` schema), or for "required" a list of `{"name", "parameters"}` objects (one item when
`parallel_tool_calls` is false).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from agent.engine.errors import InvalidRequestError
from agent.engine.structured.schema import SchemaLimits, json_schema_constraint
from agent.engine.types import Message, OutputConstraint, ToolCall

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

GENERIC_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ----------------------------------------------------------------------------------------------- request checking
def check_tools(tools: Sequence[Any], limits: SchemaLimits) -> tuple[dict[str, Any], ...]:
    """OpenAI `tools` -> checked tools (`{"type": "function", "function": {name, description?, parameters}}`)."""
    checked: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidRequestError(f"{where}: only {{'type': 'function', 'function': {{...}}}} tools are supported")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"{where}.function.name: 1-64 letters, digits, '_' or '-'")
        if name in names:
            raise InvalidRequestError(f"{where}.function.name: {name!r} is defined twice")
        names.add(name)
        parameters = fn.get("parameters", _EMPTY_PARAMETERS)
        json_schema_constraint(parameters, limits, field=f"{where}.function.parameters")  # check only
        out: dict[str, Any] = {"name": name, "parameters": parameters}
        if isinstance(fn.get("description"), str):
            out["description"] = fn["description"]
        checked.append({"type": "function", "function": out})
    return tuple(checked)


def forced_function(tool_choice: Any, tools: Sequence[dict[str, Any]]) -> str | None:
    """The function name a `tool_choice` forces (`{"type": "function", "function": {"name"}}`), else None."""
    if not isinstance(tool_choice, dict):
        return None
    name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise InvalidRequestError("tool_choice: expected 'none', 'auto', 'required' or a function by name")
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidRequestError(f"tool_choice: function {name!r} is not in tools")
    return name


def tool_constraint(
    tools: Sequence[dict[str, Any]], tool_choice: Any, *, parallel: bool, limits: SchemaLimits
) -> OutputConstraint | None:
    """The constraint for a forced call: the named function's arguments, or for "required" a list of calls."""
    name = forced_function(tool_choice, tools)
    if name is not None:
        fn = next(t["function"] for t in tools if t["function"]["name"] == name)
        return json_schema_constraint(fn["parameters"], limits, field="tool_choice")
    if tool_choice != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "parameters": t["function"]["parameters"]},
            "required": ["name", "parameters"],
        }
        for t in tools
    ]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return json_schema_constraint(schema, limits, field="tools")


# ----------------------------------------------------------------------------------------------- reading answers
def forced_calls(text: str, tool_choice: Any, tools: Sequence[dict[str, Any]]) -> list[ToolCall] | None:
    """The calls in a forced answer (see `tool_constraint`); None when the text is not complete JSON (cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    name = forced_function(tool_choice, tools)
    if name is not None:
        return [ToolCall(new_call_id(), name, text.strip())]  # the arguments exactly as generated
    if not isinstance(value, list):
        return None
    compact = {"ensure_ascii": False, "separators": (",", ":")}  # as the grammar writes JSON
    return [
        ToolCall(new_call_id(), str(c.get("name")), json.dumps(c.get("parameters", {}), **compact))
        for c in value
        if isinstance(c, dict)
    ]


def parse_tool_calls(text: str, tools: Sequence[dict[str, Any]], *, parallel: bool) -> tuple[str, list[ToolCall]]:
    """Split an "auto" answer into its text and its `<tool_call>` blocks (calls to unknown functions or with
    invalid JSON are left in the text, as the model wrote them)."""
    known = {t["function"]["name"] for t in tools}
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in _TOOL_CALL.finditer(text):
        call = _call_from_json(match.group(1), known)
        if call is None or (calls and not parallel):
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    return ("".join(kept).strip() if calls else text), calls


def _call_from_json(body: str, known: set[str]) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in known:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def may_be_tool_call(text: str) -> bool:
    """While streaming an "auto" answer: the text so far could still become a `<tool_call>` block."""
    stripped = text.lstrip()
    return TOOL_CALL_OPEN.startswith(stripped) or stripped.startswith(TOOL_CALL_OPEN)


# ----------------------------------------------------------------------------------------------- prompt rendering
def template_supports_tools(renderer: Any) -> bool:
    """The tokenizer's (or processor's) chat template renders `tools` itself."""
    template = getattr(renderer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = template.get("default") or " ".join(str(t) for t in template.values())
    return isinstance(template, str) and "tools" in template


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def native_tool_fields(message: Message) -> dict[str, Any]:
    """The extra keys a tool-aware Hugging Face template reads on a message."""
    extra: dict[str, Any] = {}
    if message.tool_calls:
        extra["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments_object(c.arguments)},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        extra["tool_call_id"] = message.tool_call_id
    return extra


def generic_tool_messages(
    messages: list[dict[str, Any]], source: Sequence[Message], tools: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Template messages rewritten into the generic tool format (see the module docstring)."""
    out: list[dict[str, Any]] = []
    results: dict[str, Any] | None = None  # the user turn collecting consecutive tool results
    for rendered, message in zip(messages, source, strict=True):
        if message.role == "tool":
            block = f"<tool_response>\n{message.text_content}\n</tool_response>"
            if results is None:
                results = {"role": "user", "content": block}
                out.append(results)
            else:
                results["content"] += "\n" + block
            continue
        results = None
        if message.tool_calls:
            calls = "\n".join(
                f"{TOOL_CALL_OPEN}\n"
                + json.dumps({"name": c.name, "arguments": _arguments_object(c.arguments)}, ensure_ascii=False)
                + f"\n{TOOL_CALL_CLOSE}"
                for c in message.tool_calls
            )
            rendered = {**rendered, "content": _append_text(rendered["content"], calls)}
        out.append(rendered)
    if tools:
        listing = GENERIC_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": _append_text(out[0]["content"], listing)}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _append_text(content: Any, text: str) -> Any:
    """Add a paragraph to a template message's content (a string, or a vision template's list of parts)."""
    if isinstance(content, list):
        return [*content, {"type": "text", "text": ("\n\n" if content else "") + text}]
    return f"{content}\n\n{text}" if content else text
