"""The event-loop side of the engines whose requests run on one scheduler thread (ONNX, OpenVINO): their common
lifecycle (`ScheduledEngine`), the checks each makes before queueing a request, the thread-safe channel that carries
a request's chunks from the scheduler thread to its coroutine, and the loop that yields them to the door.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable
from typing import Any

from agent.engine.base import Engine
from agent.engine.errors import EngineError, EngineFailure, InvalidRequestError, NotReadyError
from agent.engine.types import GenerationChunk, SamplingParams

Item = GenerationChunk | BaseException


class ScheduledEngine(Engine):
    """An engine whose `start()` sets `_loaded` to what it loaded, with at least a `scheduler` (an
    agent.engine.scheduler_thread.InboxSchedulerThread) and `grammars` (closed on shutdown). `label` names the
    engine in messages."""

    label: str
    _loaded: Any = None

    async def shutdown(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            await asyncio.to_thread(loaded.scheduler.stop)
            loaded.grammars.close()

    async def health(self) -> bool:
        return self._loaded is not None and self._loaded.scheduler.alive

    async def abort(self, request_id: str) -> None:
        if self._loaded is not None:
            self._loaded.scheduler.abort(request_id)

    def _running(self) -> Any:
        """What start() loaded, while its scheduler runs; else NotReadyError (503)."""
        loaded = self._loaded
        if loaded is None or not loaded.scheduler.alive:
            raise NotReadyError(f"the {self.label} engine is not started", retry_after=5)
        return loaded

    def _submit(self, loaded: Any, seq: Any, channel: ChunkChannel) -> AsyncGenerator[GenerationChunk]:
        """Queue `seq`; its chunks. Iterate them under contextlib.aclosing, so that a caller who stops early
        (client gone) aborts the request at once, not whenever the garbage collector finalizes the generator."""
        loaded.scheduler.submit(seq)
        return channel.chunks(self.label, lambda: loaded.scheduler.abort(seq.request_id))


def check_sampling(sampling: SamplingParams) -> None:
    """The sampling settings a scheduler cannot run with (400 before anything is queued)."""
    if sampling.max_new_tokens < 1:
        raise InvalidRequestError("max_new_tokens must be at least 1")
    if not 0.0 < sampling.top_p <= 1.0:
        raise InvalidRequestError("top_p must be in (0, 1]")


def room_after(prompt_tokens: int, context_length: int) -> int:
    """How many tokens the context leaves after the prompt; a prompt that fills it is refused (400)."""
    room = context_length - prompt_tokens
    if room < 1:
        raise InvalidRequestError(
            f"prompt is {prompt_tokens} tokens; the model's context is {context_length} "
            "(shorten the message or MAX_HISTORY)"
        )
    return room


class ChunkChannel:
    """Chunks (or the exception that ended the request) from the scheduler thread to one request's coroutine.
    Made on the event loop; `put` is the sequence's sink and may be called from any thread."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Item] = asyncio.Queue()

    def put(self, item: Item) -> None:
        if not self._loop.is_closed():  # a request outliving its loop (shutdown) has no one left to tell
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def chunks(self, engine: str, abort: Callable[[], None]) -> AsyncGenerator[GenerationChunk]:
        """The request's chunks until the finished one. A request error the scheduler found (an EngineError, its
        status set) is raised as it is; anything else ends the request as an EngineFailure naming `engine`. If the
        caller closes the stream early (client gone), `abort` frees the request's place in the scheduler."""
        finished = False
        failure: BaseException | None = None
        try:
            while not finished:
                item = failure or await self.queue.get()
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineFailure(f"{engine} generation failed: {item}") from item
                item, failure = coalesce(item, self.queue)
                finished = item.finished
                yield item
        finally:
            if not finished:
                abort()


def coalesce(chunk: GenerationChunk, queue: asyncio.Queue[Item]) -> tuple[GenerationChunk, BaseException | None]:
    """`chunk` merged with the chunks already waiting behind it: a consumer that fell behind the scheduler (a busy
    door sending other streams' responses) gets one chunk for them all, text joined and the counts and finish reason
    of the last, so each response it sends carries several tokens instead of paying its cost per token. A consumer
    that keeps up finds the queue empty and gets every token on its own. An error waiting behind is returned
    separately, to be raised after the text before it is delivered."""
    texts: list[str] = []
    while not chunk.finished and not queue.empty():
        following = queue.get_nowait()
        if isinstance(following, BaseException):
            return _joined(chunk, texts), following
        texts.append(chunk.text)
        chunk = following
    return _joined(chunk, texts), None


def _joined(last: GenerationChunk, texts: list[str]) -> GenerationChunk:
    if not texts:
        return last
    return dataclasses.replace(last, text="".join(texts) + last.text)
