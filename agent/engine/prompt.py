"""Prompt building shared by every door: history trimming and chat-template messages with image placeholders.

The same conversation gives the same prompt through FastAPI and Triton because both call `render_prompt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.engine.types import ImagePart, Message, TextPart


def trim_history(history: Sequence[Message], max_turns: int) -> list[Message]:
    """Keep the last `max_turns` user+assistant turns (a turn starts at a user message); system messages stay."""
    system = [m for m in history if m.role == "system"]
    rest = [m for m in history if m.role != "system"]
    if max_turns <= 0:
        return system
    starts = [i for i, m in enumerate(rest) if m.role == "user"]
    if len(starts) > max_turns:
        rest = rest[starts[-max_turns] :]
    return system + rest


def template_messages(messages: Sequence[Message], *, vision: bool) -> list[dict[str, Any]]:
    """Messages in the shape HF chat templates expect.

    Vision templates take a list of typed parts (`{"type": "image"}` becomes the model's image placeholder tokens);
    text-only templates take a plain string.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        if vision:
            content: Any = [
                {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in m.parts
            ]
        else:
            content = "".join(p.text for p in m.parts if isinstance(p, TextPart))
        out.append({"role": m.role, "content": content})
    return out


def render_prompt(
    tokenizer_or_processor: Any,
    messages: Sequence[Message],
    *,
    vision: bool,
    tools: Sequence[dict[str, Any]] = (),
) -> str:
    """The prompt text for a conversation, ending with the assistant's turn opener.

    Tools, tool calls and tool results go through the model's template when it knows tools, else through the
    generic format of agent.engine.structured.tools.
    """
    rendered = template_messages(messages, vision=vision)
    kwargs: dict[str, Any] = {}
    if tools or any(m.tool_calls or m.role == "tool" for m in messages):
        from agent.engine.structured import tools as tooling

        if tooling.template_supports_tools(tokenizer_or_processor):
            rendered = [{**r, **tooling.native_tool_fields(m)} for r, m in zip(rendered, messages, strict=True)]
            if tools:
                kwargs["tools"] = list(tools)
        else:
            rendered = tooling.generic_tool_messages(rendered, messages, tools)
    return tokenizer_or_processor.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True, **kwargs)
