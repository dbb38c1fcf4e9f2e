"""`response_format`, `tools` and `tool_choice` of `/v1/chat/completions`: the request's constraint and tools, and the
answer's text turned back into OpenAI's `content` / `tool_calls` (whole, or as streamed deltas).

The engine sees only a constraint (agent.engine.types.OutputConstraint) and the tools to render in the prompt; what
the tool calls mean is decided here, so every engine, and the gateway in front of Triton, behaves the same.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from agent.engine.errors import InvalidRequestError
from agent.engine.structured import tools as tooling
from agent.engine.structured.schema import SchemaLimits, response_format_constraint
from agent.engine.types import GenerationChunk, OutputConstraint, ToolCall

ToolChoice = str | dict[str, Any]


@dataclass(frozen=True)
class ToolPlan:
    """What the request allows: the tools the prompt lists, and whether the answer is a forced call."""

    tools: tuple[dict[str, Any], ...] = ()
    choice: ToolChoice = "none"
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and (self.choice == "required" or isinstance(self.choice, dict))


def plan_request(
    response_format: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: ToolChoice | None,
    parallel: bool,
    limits: SchemaLimits,
) -> tuple[OutputConstraint | None, ToolPlan]:
    """Check the request's structured-output fields (MAX_SCHEMA_* limits); return the engine constraint and the tool
    plan (400s here)."""
    constraint = response_format_constraint(response_format, limits)
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice: needs `tools`")
        return constraint, ToolPlan()
    checked = tooling.check_tools(tools, limits)
    choice: ToolChoice = "auto" if tool_choice is None else tool_choice
    plan = ToolPlan(checked if choice != "none" else (), choice, parallel)
    if plan.forced:
        if constraint is not None:
            raise InvalidRequestError("response_format: cannot be combined with a tool_choice that forces a call")
        constraint = tooling.tool_constraint(checked, choice, parallel=parallel, limits=limits)
    return constraint, plan


@dataclass
class Answer:
    """The answer in OpenAI's terms."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None


def read_answer(text: str, finish_reason: str | None, plan: ToolPlan) -> Answer:
    """The whole generated text -> content or tool calls. A forced call cut short (`length`) stays text."""
    if not plan.active:
        return Answer(text, finish_reason=finish_reason)
    if plan.forced:
        calls = tooling.forced_calls(text, plan.choice, plan.tools) if finish_reason == "stop" else None
        if calls:
            return Answer(None, calls, "tool_calls")
        return Answer(text, finish_reason=finish_reason)
    content, calls = tooling.parse_tool_calls(text, plan.tools, parallel=plan.parallel)
    if calls:
        return Answer(content or None, calls, "tool_calls")
    return Answer(text, finish_reason=finish_reason)


def tool_call_out(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's streamed shape: one delta per call, with its id, name and (whole) arguments."""
    return [{"index": i, **tool_call_out(c)} for i, c in enumerate(calls)]


@dataclass(frozen=True)
class Delta:
    """One piece of a streamed answer: text, or (at the end) the tool calls and the finish reason."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    chunk: GenerationChunk | None = None  # the engine chunk it came from (counts)


async def answer_deltas(chunks: AsyncIterator[GenerationChunk], plan: ToolPlan) -> AsyncIterator[Delta]:
    """Engine chunks -> deltas. Without tools, text passes through as it comes. With tools, text that may be the
    start of a `<tool_call>` is held back; a forced call is held whole; calls go out at the end, in one delta each."""
    if not plan.active:
        async for chunk in chunks:
            yield Delta(chunk.text, finish_reason=chunk.finish_reason, chunk=chunk)
        return
    text, sent, call_at = "", 0, -1
    async for chunk in chunks:
        text += chunk.text
        if not chunk.finished:
            if chunk.completion_tokens <= 1 and not sent:
                yield Delta("", chunk=chunk)  # the stream starts now (its first event carries the role)
            if plan.forced or call_at >= 0:
                continue
            call_at = text.find(tooling.TOOL_CALL_OPEN, sent)
            safe = call_at if call_at >= 0 else len(text) - _partial_open(text)
            while safe > sent and text[safe - 1].isspace():  # held too: dropped if a call follows, as in `read_answer`
                safe -= 1
            if safe > sent:
                yield Delta(text[sent:safe], chunk=chunk)
                sent = safe
            continue
        # The text already sent is content; what is left is read as a whole answer would be.
        answer = read_answer(text[sent:], chunk.finish_reason, plan)
        if not answer.tool_calls:
            yield Delta(text[sent:], finish_reason=answer.finish_reason, chunk=chunk)
            return
        if answer.content:
            yield Delta(answer.content, chunk=chunk)
        yield Delta(tool_calls=answer.tool_calls, finish_reason=answer.finish_reason, chunk=chunk)
        return


def _partial_open(text: str) -> int:
    """Length of the longest end of `text` that begins `<tool_call>` (held back: the next token may complete it)."""
    opener = tooling.TOOL_CALL_OPEN
    for n in range(min(len(opener) - 1, len(text)), 0, -1):
        if opener.startswith(text[-n:]):
            return n
    return 0


def arguments_text(arguments: Any) -> str:
    """A tool call's `arguments` as sent back by a client (normally a JSON text) -> JSON text."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
