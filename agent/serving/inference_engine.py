"""The chat service behind the FastAPI door: sessions + history + prompt -> engine.

`chat` / `chat_stream` are the seed's stateful chat. The session's last MAX_HISTORY turns plus the new user message
go to the engine; the user turn and the answer are committed to SQLite before the final reply is handed back, so an
acknowledged answer is never lost. Aborted or failed generations are not stored.

Images: the new message's image is decoded and size-checked once, off the event loop. History keeps only whether a
turn had an image (`has_image`), not its pixels, so follow-up turns do not resend earlier images to the model: ask
about an image in the same message that carries it.

The engine itself (loading, swaps, admission, abort on disconnect) lives in `agent.serving.api.engine_runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from agent.config import Settings
from agent.engine.errors import EngineFailure, NotFoundError, PayloadTooLargeError, UnsupportedInputError
from agent.engine.images import ImageLimits, decode_b64_image
from agent.engine.prompt import trim_history
from agent.engine.types import GenerationChunk, GenerationRequest, ImagePart, Message, Part, SamplingParams, TextPart
from agent.serving.api.engine_runner import EngineRunner
from agent.serving.api.history_store import HistoryStore, StoredTurn

VISION_MODEL_HINT = "Qwen/Qwen3-VL-8B-Instruct"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ChatDelta:
    """New answer text of a streamed chat."""

    text: str


@dataclass(frozen=True)
class ChatReply:
    """The whole answer: the last event of `chat_stream`, the result of `chat`."""

    session_id: str
    response: str
    usage: Usage
    finish_reason: str
    response_time: float


ChatEvent = ChatDelta | ChatReply


class ChatService:
    """Sessions, history and prompts over one `EngineRunner` (which holds the current engine)."""

    def __init__(self, settings: Settings, store: HistoryStore, runner: EngineRunner) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self._image_limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)

    # --- stateful chat ------------------------------------------------------------------------------------------

    async def chat(
        self, session_id: str | None, message: str, image_b64: str | None, sampling: SamplingParams
    ) -> ChatReply:
        """One chat turn, answered whole."""
        async with contextlib.aclosing(self.chat_stream(session_id, message, image_b64, sampling)) as events:
            async for event in events:
                if isinstance(event, ChatReply):
                    return event
        raise EngineFailure("chat stream ended without a reply")

    async def chat_stream(
        self, session_id: str | None, message: str, image_b64: str | None, sampling: SamplingParams
    ) -> AsyncIterator[ChatEvent]:
        """One chat turn as `ChatDelta` events and a final `ChatReply`, yielded after the turn is committed."""
        started, asked_at = time.monotonic(), time.time()
        session = await self.resolve_session(session_id)
        user = await self._user_message(message, image_b64)
        stored = await self.store.history(session, last_turns=self.settings.max_history)
        messages = trim_history([t.to_message() for t in stored], self.settings.max_history) + [user]
        request = GenerationRequest(messages=tuple(messages), sampling=sampling)
        parts: list[str] = []
        last: GenerationChunk | None = None
        async with contextlib.aclosing(self.runner.generate(request)) as chunks:
            async for chunk in chunks:
                if chunk.text:
                    parts.append(chunk.text)
                    yield ChatDelta(chunk.text)
                last = chunk
        if last is None or last.finish_reason is None:
            raise EngineFailure(f"request {request.request_id}: the engine stream ended without a final chunk")
        if last.finish_reason == "error":
            raise EngineFailure(f"request {request.request_id}: the engine failed while generating")
        answer = "".join(parts)
        if last.finish_reason in ("stop", "length"):
            await self.store.append_turn(session, message, answer, has_image=image_b64 is not None, asked_at=asked_at)
        yield ChatReply(
            session_id=session,
            response=answer,
            usage=Usage(last.prompt_tokens, last.completion_tokens),
            finish_reason=last.finish_reason,
            response_time=time.monotonic() - started,
        )

    async def _user_message(self, message: str, image_b64: str | None) -> Message:
        if len(message) > self.settings.max_message_chars:
            raise PayloadTooLargeError(
                f"message: {len(message)} characters, more than MAX_MESSAGE_CHARS={self.settings.max_message_chars}"
            )
        parts: list[Part] = []
        if image_b64 is not None:
            self.require_images(1)
            parts.append(await self.decode_image(image_b64))
        parts.append(TextPart(message))
        return Message(role="user", parts=tuple(parts))

    # --- images -------------------------------------------------------------------------------------------------

    def require_images(self, count: int) -> None:
        """Refuse images the loaded model cannot see (400, naming a model to load) or too many of them (413)."""
        info = self.runner.info()
        if count and not info.supports_images:
            raise UnsupportedInputError(
                f"model {info.model_name!r} is text-only and cannot read images: load a vision model first, e.g. "
                f'POST /load_model {{"model_path": "{VISION_MODEL_HINT}"}}'
            )
        if count > self.settings.max_images_per_request:
            raise PayloadTooLargeError(
                f"{count} images, more than MAX_IMAGES_PER_REQUEST={self.settings.max_images_per_request}"
            )

    async def decode_image(self, data: str) -> ImagePart:
        """Base64 or data URL -> a size-checked RGB image, decoded off the event loop."""
        return ImagePart(await asyncio.to_thread(decode_b64_image, data, self._image_limits))

    # --- sessions -----------------------------------------------------------------------------------------------

    async def resolve_session(self, session_id: str | None) -> str:
        """The session to use: the default one (always exists) when none is named, else an existing one (404)."""
        session = session_id or self.settings.default_session
        if session == self.settings.default_session:
            await self.store.create(session, exist_ok=True)
        elif not await self.store.exists(session):
            raise NotFoundError(f"session {session!r} not found: create one with POST /sessions")
        return session

    async def history(self, session_id: str | None) -> tuple[str, list[StoredTurn]]:
        """A session's id and its whole stored history, oldest first."""
        session = await self.resolve_session(session_id)
        return session, await self.store.history(session)

    async def clear_history(self, session_id: str | None) -> str:
        """Forget a session's turns (the session stays); returns its id."""
        session = await self.resolve_session(session_id)
        await self.store.clear(session)
        return session

    async def delete_session(self, session_id: str) -> None:
        """Delete a session and its history (404 if unknown)."""
        if not await self.store.delete(session_id):
            raise NotFoundError(f"session {session_id!r} not found")
