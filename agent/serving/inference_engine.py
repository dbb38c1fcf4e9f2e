"""The chat service behind the FastAPI door: sessions + history + prompt -> engine.

`chat` / `chat_stream` are the seed's stateful chat. The session's last MAX_HISTORY turns plus the new user message
go to the engine; the user turn and the answer are committed to the store (SQLite or PostgreSQL) before the final
reply is handed back, so an acknowledged answer is never lost. Aborted or failed generations are not stored.

Principals: every call may name the caller (agent.serving.api.principals). A caller uses its own sessions only
(another's answers 404, as if missing; admins may use any), its default session is its own, and `generate` runs
within its per-principal limits and records its usage (agent.serving.api.quotas). No principal: the local operator.

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
from typing import TYPE_CHECKING

from agent.config import Settings
from agent.engine import limits
from agent.engine.base import final_chunk
from agent.engine.errors import EngineFailure, NotFoundError, UnsupportedInputError
from agent.engine.images import image_part
from agent.engine.prompt import trim_history
from agent.engine.types import GenerationChunk, GenerationRequest, ImagePart, Message, Part, SamplingParams, TextPart

if TYPE_CHECKING:  # only handed in: the FastAPI app builds them (api/ imports this module, never the reverse)
    from agent.serving.api.engine_runner import EngineRunner
    from agent.serving.api.history_store import HistoryStore, StoredTurn
    from agent.serving.api.principals import Principal
    from agent.serving.api.quotas import PrincipalLimits
    from agent.serving.api.store import UsageRecord

OPERATOR = "local"  # who calls when no principal is given (no keys configured): agent.serving.api.principals

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

    def __init__(
        self, settings: Settings, store: HistoryStore, runner: EngineRunner, quotas: PrincipalLimits | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.quotas = quotas  # per-principal limits and usage (None: neither)
        self.limits = limits.RequestLimits.from_settings(settings)  # the request rules, as at the Triton door

    # --- stateful chat ------------------------------------------------------------------------------------------

    async def chat(
        self,
        session_id: str | None,
        message: str,
        image_b64: str | None,
        sampling: SamplingParams,
        principal: Principal | None = None,
    ) -> ChatReply:
        """One chat turn, answered whole."""
        stream = self.chat_stream(session_id, message, image_b64, sampling, principal)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if isinstance(event, ChatReply):
                    return event
        raise EngineFailure("chat stream ended without a reply")

    async def chat_stream(
        self,
        session_id: str | None,
        message: str,
        image_b64: str | None,
        sampling: SamplingParams,
        principal: Principal | None = None,
    ) -> AsyncIterator[ChatEvent]:
        """One chat turn as `ChatDelta` events and a final `ChatReply`, yielded after the turn is committed."""
        started, asked_at = time.monotonic(), time.time()
        session = await self.resolve_session(session_id, principal)
        user = await self._user_message(message, image_b64)
        stored = await self.store.history(session, last_turns=self.settings.max_history)
        messages = trim_history([t.to_message() for t in stored], self.settings.max_history) + [user]
        request = GenerationRequest(messages=tuple(messages), sampling=sampling)
        parts: list[str] = []
        last: GenerationChunk | None = None
        usage: UsageRecord | None = None  # counted when the generation finishes, written with the turn
        try:
            generation = self.generate(request, principal, record_usage=False)
            async with contextlib.aclosing(generation) as chunks:
                async for chunk in chunks:
                    last = chunk
                    if chunk.finished and self.quotas is not None and principal is not None:
                        usage = self.quotas.usage(principal, chunk.prompt_tokens, chunk.completion_tokens)
                    if chunk.text:
                        parts.append(chunk.text)
                        yield ChatDelta(chunk.text)
            last = final_chunk(last, request.request_id)
            answer = "".join(parts)
            if last.finish_reason in ("stop", "length"):
                await self.store.append_turn(
                    session, message, answer, has_image=image_b64 is not None, asked_at=asked_at, usage=usage
                )
                usage = None  # written in the turn's transaction
        finally:
            if usage is not None and self.quotas is not None:  # no turn stored (error, client gone): usage alone
                await self.quotas.store_usage(usage)
        yield ChatReply(
            session_id=session,
            response=answer,
            usage=Usage(last.prompt_tokens, last.completion_tokens),
            finish_reason=last.finish_reason,
            response_time=time.monotonic() - started,
        )

    async def generate(
        self, request: GenerationRequest, principal: Principal | None = None, *, record_usage: bool = True
    ) -> AsyncIterator[GenerationChunk]:
        """`runner.generate` within the principal's limits (429 beyond), recording its usage when it finishes
        (unless `record_usage` is False: the caller writes it, e.g. with the chat turn)."""
        if self.quotas is None or principal is None:
            async with contextlib.aclosing(self.runner.generate(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        async with self.quotas.admit(principal), contextlib.aclosing(self.runner.generate(request)) as chunks:
            async for chunk in chunks:
                if chunk.finished and record_usage:  # before the last chunk goes out: the caller may stop there
                    await self.quotas.record(principal, chunk.prompt_tokens, chunk.completion_tokens)
                yield chunk

    async def _user_message(self, message: str, image_b64: str | None) -> Message:
        limits.check_message_chars(len(message), self.limits, "message")
        parts: list[Part] = []
        if image_b64 is not None:
            self.require_images(1, "image_base64")
            parts.append(await self.decode_image(image_b64))
        parts.append(TextPart(message))
        return Message(role="user", parts=tuple(parts))

    # --- images -------------------------------------------------------------------------------------------------

    def require_images(self, count: int, name: str = "messages") -> None:
        """Refuse too many images (413, the request rule) or any the loaded model cannot see (400, naming a model
        to load)."""
        limits.check_image_count(count, self.limits, name)
        info = self.runner.info()
        if count and not info.supports_images:
            raise UnsupportedInputError(
                f"model {info.model_name!r} is text-only and cannot read images: load a vision model first, e.g. "
                f'POST /load_model {{"model_path": "{VISION_MODEL_HINT}"}}'
            )

    async def decode_image(self, data: str) -> ImagePart:
        """Base64 or data URL -> a size-checked RGB image, decoded off the event loop."""
        return await asyncio.to_thread(image_part, data, self.limits.image)

    # --- sessions -----------------------------------------------------------------------------------------------

    async def resolve_session(self, session_id: str | None, principal: Principal | None = None) -> str:
        """The session to use: the caller's default one (always exists) when none is named, else an existing one
        the caller may use (404 otherwise, also for another learner's session: its existence is not revealed)."""
        owner = principal.name if principal is not None else OPERATOR
        default = (
            principal.default_session(self.settings.default_session) if principal else self.settings.default_session
        )
        session = session_id or default
        found = await self.store.owner_of(session)
        if found is None and session == default:  # made on first use (one read per request after that)
            await self.store.create(session, owner=owner, exist_ok=True)
            found = await self.store.owner_of(session)
        if found is None or (found != owner and not (principal is None or principal.is_admin)):
            raise NotFoundError(f"session {session!r} not found: create one with POST /sessions")
        return session

    async def history(self, session_id: str | None, principal: Principal | None = None) -> tuple[str, list[StoredTurn]]:
        """A session's id and its whole stored history, oldest first."""
        session = await self.resolve_session(session_id, principal)
        return session, await self.store.history(session)

    async def clear_history(self, session_id: str | None, principal: Principal | None = None) -> str:
        """Forget a session's turns (the session stays); returns its id."""
        session = await self.resolve_session(session_id, principal)
        await self.store.clear(session)
        return session

    async def delete_session(self, session_id: str, principal: Principal | None = None) -> None:
        """Delete a session and its history (404 if unknown or not the caller's)."""
        await self.resolve_session(session_id, principal)
        if not await self.store.delete(session_id):
            raise NotFoundError(f"session {session_id!r} not found")
