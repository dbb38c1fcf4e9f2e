"""OpenAI-compatible routes: `POST /v1/chat/completions` (plain and SSE) and `GET /v1/models`.

Stateless: the client sends the whole conversation. Images come as `image_url` parts with `data:` URLs.
Streams end with `data: [DONE]`; `stream_options.include_usage` adds a last chunk with the token counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from agent.engine import limits
from agent.engine.base import final_chunk
from agent.engine.errors import InvalidRequestError, NotFoundError
from agent.engine.types import GenerationChunk, GenerationRequest, Message, Part, TextPart, ToolCall
from agent.serving.api.auth import PrincipalDep
from agent.serving.api.deps import RunnerDep, ServiceDep
from agent.serving.api.openai_schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageIn,
    ChatMessageOut,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ImageContent,
    ModelCard,
    ModelList,
    UsageInfo,
)
from agent.serving.api.openai_structured import (
    ToolPlan,
    answer_deltas,
    arguments_text,
    plan_request,
    read_answer,
    tool_call_deltas,
    tool_call_out,
)
from agent.serving.api.sse import cancel_on_disconnect, first_event, sse_response
from agent.serving.inference_engine import ChatService

router = APIRouter(prefix="/v1", tags=["openai"])
_STARTED = int(time.time())


@router.get("/models", response_model=ModelList, response_model_exclude_none=True)  # `versions`: gateway mode only
async def list_models(runner: RunnerDep) -> ModelList:
    """The loaded model (503 while loading); in gateway mode also Triton's versions of it."""
    info = runner.info()
    card = ModelCard(id=info.model_name, created=_STARTED, max_model_len=info.context_length)
    return ModelList(data=[card], versions=await runner.versions())


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream: true"}},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep, principal: PrincipalDep
) -> Any:
    """OpenAI Chat Completions over the loaded model."""
    model = service.runner.info().model_name
    if body.model and body.model != model:
        raise NotFoundError(f"model {body.model!r} is not loaded; this server serves {model!r} (GET /v1/models)")
    generation, plan = await _generation_request(body, service)
    meta = {"id": f"chatcmpl-{generation.request_id}", "created": int(time.time()), "model": model}
    chunks = service.generate(generation, principal)  # within the caller's limits, counted in its usage
    if body.stream:
        stream = _stream(chunks, meta, generation.request_id, plan, include_usage=body.include_usage)
        events = await first_event(request, stream)
        return sse_response(request, events, lambda event: event, done="[DONE]")
    text, last = await cancel_on_disconnect(request, _collect(chunks, generation.request_id))
    answer = read_answer(text, last.finish_reason, plan)
    calls = [tool_call_out(c) for c in answer.tool_calls] or None
    message = ChatMessageOut(content=answer.content, tool_calls=calls)  # type: ignore[arg-type]
    return ChatCompletion(
        **meta, choices=[Choice(message=message, finish_reason=answer.finish_reason)], usage=_usage(last)
    )


async def _generation_request(body: ChatCompletionRequest, service: ChatService) -> tuple[GenerationRequest, ToolPlan]:
    """The request rules (agent.engine.limits) first, then the messages with their images decoded."""
    images = sum(isinstance(p, ImageContent) for m in body.messages if isinstance(m.content, list) for p in m.content)
    service.require_images(images)
    newer = body.max_completion_tokens is not None  # OpenAI's newer name wins when both are sent
    sampling = limits.sampling_params(
        service.limits,
        max_tokens=body.max_completion_tokens if newer else body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_sequences,
        ignore_eos=body.ignore_eos,
        max_tokens_name="max_completion_tokens" if newer else "max_tokens",
    )
    constraint, plan = plan_request(
        body.response_format, body.tools, body.tool_choice, body.parallel_tool_calls, service.limits.schema
    )
    sampling = dataclasses.replace(sampling, constraint=constraint)
    messages = tuple([await _message(m, service) for m in body.messages])
    return GenerationRequest(messages=messages, sampling=sampling, tools=plan.tools), plan


async def _message(message: ChatMessageIn, service: ChatService) -> Message:
    role = "system" if message.role == "developer" else message.role
    content = message.content or ""
    parts: list[Part] = []
    for part in [content] if isinstance(content, str) else content:
        if isinstance(part, str):
            parts.append(TextPart(part))
        elif isinstance(part, ImageContent):
            if not part.image_url.url.startswith("data:"):
                raise InvalidRequestError("image_url: only data: URLs are accepted (remote images are not fetched)")
            parts.append(await service.decode_image(part.image_url.url))
        else:
            parts.append(TextPart(part.text))
    limits.check_message_chars(sum(len(p.text) for p in parts if isinstance(p, TextPart)), service.limits)
    calls = tuple(
        ToolCall(c.id, c.function.name, arguments_text(c.function.arguments)) for c in message.tool_calls or ()
    )
    if role == "tool" and not message.tool_call_id:
        raise InvalidRequestError("messages: a tool message needs `tool_call_id`")
    return Message(role=role, parts=tuple(parts), tool_calls=calls, tool_call_id=message.tool_call_id)


async def _collect(chunks: AsyncIterator[GenerationChunk], request_id: str) -> tuple[str, GenerationChunk]:
    text: list[str] = []
    last: GenerationChunk | None = None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            text.append(chunk.text)
            last = chunk
    return "".join(text), final_chunk(last, request_id)


async def _stream(
    chunks: AsyncIterator[GenerationChunk],
    meta: dict[str, Any],
    request_id: str,
    plan: ToolPlan,
    *,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """Engine chunks -> `chat.completion.chunk` objects (the first carries the role; tool calls come as OpenAI's
    `tool_calls` deltas, see agent.serving.api.openai_structured)."""
    first = True
    last: GenerationChunk | None = None
    async with contextlib.aclosing(chunks):
        async for piece in answer_deltas(chunks, plan):
            chunk = piece.chunk
            if chunk is not None:
                last = final_chunk(chunk, request_id) if chunk.finished else chunk
            if piece.content or piece.tool_calls or first or piece.finish_reason:
                calls = tool_call_deltas(piece.tool_calls) or None
                content = None if calls else piece.content
                role = "assistant" if first else None
                delta = DeltaMessage(role=role, content=content, tool_calls=calls)  # type: ignore[arg-type]
                choice = ChunkChoice(delta=delta, finish_reason=piece.finish_reason)
                event = ChatCompletionChunk(**meta, choices=[choice]).model_dump(exclude_none=True)
                event["choices"][0].setdefault("finish_reason", None)  # OpenAI sends it as null until the end
                event["choices"][0].setdefault("logprobs", None)
                if not calls:
                    event["choices"][0]["delta"].setdefault("content", "")
                yield event
                first = False
    last = final_chunk(last, request_id)
    if include_usage:
        yield ChatCompletionChunk(**meta, choices=[], usage=_usage(last)).model_dump()


def _usage(last: GenerationChunk) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        total_tokens=last.prompt_tokens + last.completion_tokens,
    )
