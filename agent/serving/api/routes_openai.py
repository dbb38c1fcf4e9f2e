"""OpenAI-compatible routes: `POST /v1/chat/completions` (plain and SSE) and `GET /v1/models`.

Stateless: the client sends the whole conversation. Images come as `image_url` parts with `data:` URLs.
Streams end with `data: [DONE]`; `stream_options.include_usage` adds a last chunk with the token counts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from agent.engine.errors import EngineFailure, InvalidRequestError, NotFoundError, PayloadTooLargeError
from agent.engine.types import GenerationChunk, GenerationRequest, Message, Part, TextPart
from agent.serving.api.deps import RunnerDep, ServiceDep
from agent.serving.api.errors import ValidationFailedError
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
from agent.serving.api.schemas import sampling_params
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
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep) -> Any:
    """OpenAI Chat Completions over the loaded model."""
    model = service.runner.info().model_name
    if body.model and body.model != model:
        raise NotFoundError(f"model {body.model!r} is not loaded; this server serves {model!r} (GET /v1/models)")
    generation = await _generation_request(body, service)
    meta = {"id": f"chatcmpl-{generation.request_id}", "created": int(time.time()), "model": model}
    chunks = service.runner.generate(generation)
    if body.stream:
        events = await first_event(request, _stream(chunks, meta, include_usage=body.include_usage))
        return sse_response(request, events, lambda event: event, done="[DONE]")
    text, last = await cancel_on_disconnect(request, _collect(chunks))
    return ChatCompletion(
        **meta,
        choices=[Choice(message=ChatMessageOut(content=text), finish_reason=last.finish_reason)],
        usage=_usage(last),
    )


async def _generation_request(body: ChatCompletionRequest, service: ChatService) -> GenerationRequest:
    images = sum(isinstance(p, ImageContent) for m in body.messages if isinstance(m.content, list) for p in m.content)
    service.require_images(images)
    limit = service.settings.max_stop_chars
    if any(len(s) > limit for s in body.stop_sequences):
        raise ValidationFailedError(f"stop: a stop sequence longer than MAX_STOP_CHARS={limit} characters")
    messages = tuple([await _message(m, service) for m in body.messages])
    max_tokens = body.max_completion_tokens or body.max_tokens
    sampling = sampling_params(
        service.settings,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_sequences,
        ignore_eos=body.ignore_eos,
        field="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
    )
    return GenerationRequest(messages=messages, sampling=sampling)


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
    chars, limit = sum(len(p.text) for p in parts if isinstance(p, TextPart)), service.settings.max_message_chars
    if chars > limit:
        raise PayloadTooLargeError(f"messages: a message of {chars} characters, more than MAX_MESSAGE_CHARS={limit}")
    return Message(role=role, parts=tuple(parts))


async def _collect(chunks: AsyncIterator[GenerationChunk]) -> tuple[str, GenerationChunk]:
    text: list[str] = []
    last: GenerationChunk | None = None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            text.append(chunk.text)
            last = chunk
    return "".join(text), _final(last)


def _final(last: GenerationChunk | None) -> GenerationChunk:
    if last is None or last.finish_reason is None:
        raise EngineFailure("the engine stream ended without a final chunk")
    if last.finish_reason == "error":
        raise EngineFailure(f"request {last.request_id}: the engine failed while generating")
    return last


async def _stream(
    chunks: AsyncIterator[GenerationChunk], meta: dict[str, Any], *, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """Engine chunks -> `chat.completion.chunk` objects (the first carries the role)."""
    first = True
    last: GenerationChunk | None = None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            last = _final(chunk) if chunk.finished else chunk
            if chunk.text or first or chunk.finished:
                delta = DeltaMessage(role="assistant" if first else None, content=chunk.text)
                choice = ChunkChoice(delta=delta, finish_reason=chunk.finish_reason)
                event = ChatCompletionChunk(**meta, choices=[choice]).model_dump()
                if not first:  # OpenAI sends the role in the first delta only
                    del event["choices"][0]["delta"]["role"]
                yield event
                first = False
    last = _final(last)
    if include_usage:
        yield ChatCompletionChunk(**meta, choices=[], usage=_usage(last)).model_dump()


def _usage(last: GenerationChunk) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        total_tokens=last.prompt_tokens + last.completion_tokens,
    )
