"""The engine behind the FastAPI door: loading in the background, atomic swaps, admission and metrics hooks.

- `generate`: one engine request with admission (at most MAX_CONCURRENT_REQUESTS generating, MAX_QUEUE waiting,
  429 beyond; 503 while the first model loads). Closing the stream early (client gone) aborts the engine request.
- `load_model`: builds a new engine with `agent.serving.model_loader.load_engine`, swaps it in atomically; requests
  in flight finish on the old engine, which is shut down when its last request ends. Loads are serialized; a failed
  load raises `ModelLoadError` (422) and leaves the current engine serving. An engine that loads models itself
  (`Engine.load_model`: the Triton gateway gives the Triton model a new version) is asked first and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio

from agent.config import Settings
from agent.engine.base import Engine
from agent.engine.errors import EngineError, ModelLoadError, NotReadyError, OverloadedError
from agent.engine.types import EngineInfo, EngineStats, GenerationChunk, GenerationRequest

log = logging.getLogger(__name__)

Loader = Callable[[Settings], Awaitable[Engine]]
LOADING_RETRY_AFTER = 5.0
OVERLOADED_RETRY_AFTER = 1.0


class GenerationObserver(Protocol):
    """Receives timings and counts of every generation (implemented by the /metrics collector)."""

    def queued(self, seconds: float) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, prompt_tokens: int, completion_tokens: int) -> None: ...
    def engine_step(self, stats: EngineStats) -> None: ...


class _NoObserver:
    def queued(self, seconds: float) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def inter_token(self, seconds: float) -> None:
        pass

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        pass

    def engine_step(self, stats: EngineStats) -> None:
        pass


@dataclass(frozen=True)
class ServiceStatus:
    state: Literal["loading", "ready", "failed"]
    info: EngineInfo | None
    running: int
    waiting: int
    error: str | None = None


class Admission:
    """At most `max_running` requests generate at once and `max_waiting` wait for a slot; beyond that, 429."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running, self.max_waiting = max_running, max_waiting
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_running)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold a generation slot; yields the seconds spent waiting for it."""
        arrived = time.monotonic()
        if self._slots.locked() and self.waiting >= self.max_waiting:
            raise OverloadedError(
                f"server busy: {self.running} requests generating and {self.waiting} waiting "
                f"(MAX_CONCURRENT_REQUESTS={self.max_running}, MAX_QUEUE={self.max_waiting})",
                retry_after=OVERLOADED_RETRY_AFTER,
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield time.monotonic() - arrived
        finally:
            self.running -= 1
            self._slots.release()


@dataclass
class _ServingEngine:
    """An engine and the requests using it; a retired engine is shut down when its last request ends."""

    engine: Engine
    owned: bool  # injected engines (tests, embedding apps) are shut down by whoever started them
    active: int = 0
    retired: bool = False


async def _default_loader(settings: Settings) -> Engine:
    from agent.serving.model_loader import load_engine

    return await load_engine(settings)


class EngineRunner:
    """Holds the current engine and the settings it was loaded with; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        loader: Loader | None = None,
        observer: GenerationObserver | None = None,
    ) -> None:
        self.settings = settings
        self.admission = Admission(settings.max_concurrent_requests, settings.max_queue)
        self.observer: GenerationObserver = observer or _NoObserver()
        self._loader = loader or _default_loader
        # An injected engine (tests, embedding apps) is already started and is never shut down by us.
        self._current = _ServingEngine(engine, owned=False) if engine is not None else None
        self._load_error: str | None = None
        self._swap_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._load_task: asyncio.Task[None] | None = None
        self._retired: list[_ServingEngine] = []  # replaced engines still finishing requests

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the configured model in the background (unless an engine was injected); /health says when ready."""
        if self._current is None and self._load_task is None:
            self._load_task = asyncio.create_task(self._initial_load())

    async def _initial_load(self) -> None:
        async with self._swap_lock:
            if self._current is not None:
                return
            log.info("loading model %s ...", self.settings.model_path or "(embedded default)")
            started = time.monotonic()
            try:
                engine = await self._loader(self.settings)
            except Exception as exc:
                self._load_error = _describe_load_failure(exc)
                log.error("model failed to load: %s (POST /load_model to try another)", self._load_error)
                return
            self._current = _ServingEngine(engine, owned=True)
            log.info("model ready: %s in %.1f s", engine.info().model_name, time.monotonic() - started)

    async def shutdown(self) -> None:
        """Stop loading, and shut down every engine this runner loaded (injected engines are left running)."""
        if self._load_task is not None:
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        engines = [h for h in [*self._retired, self._current] if h is not None and h.owned]
        self._retired, self._current = [], None
        for loaded in engines:
            await loaded.engine.shutdown()

    def status(self) -> ServiceStatus:
        loaded = self._current
        state: Literal["loading", "ready", "failed"] = "ready"
        if loaded is None:
            state = "failed" if self._load_error else "loading"
        return ServiceStatus(
            state=state,
            info=loaded.engine.info() if loaded else None,
            running=self.admission.running,
            waiting=self.admission.waiting,
            error=self._load_error,
        )

    async def healthy(self) -> bool:
        """True when a model is loaded and its engine says it can answer."""
        loaded = self._current
        return loaded is not None and await loaded.engine.health()

    def info(self) -> EngineInfo:
        """The loaded model, or `NotReadyError` (503) while none is."""
        return self._require_loaded().engine.info()

    async def versions(self) -> dict[str, Any] | None:
        """Gateway mode: the Triton model's versions and the default one (None for an in-process engine)."""
        return await self._current.engine.model_versions() if self._current is not None else None

    def current_stats(self) -> EngineStats | None:
        """The current engine's live counters (None while loading)."""
        return self._current.engine.stats if self._current is not None else None

    # --- model swap ---------------------------------------------------------------------------------------------

    async def load_model(self, changes: dict[str, Any]) -> EngineInfo:
        """Load a model with `changes` applied to the current settings and swap it in.

        A failure raises `ModelLoadError` (422) and leaves the current engine serving.
        """
        async with self._swap_lock:
            if self._current is not None:
                # Gateway mode: Triton gets a new model version and this engine stays (docs/versioning.md).
                info = await self._current.engine.load_model(changes)
                if info is not None:
                    return info
            settings = self.settings.model_copy(update=changes)
            started = time.monotonic()
            try:
                engine = await self._loader(settings)
            except Exception as exc:
                reason = _describe_load_failure(exc)
                log.warning("load_model %s failed: %s", changes, reason, exc_info=not isinstance(exc, EngineError))
                raise ModelLoadError(reason) from exc
            old, self._current = self._current, _ServingEngine(engine, owned=True)
            self.settings, self._load_error = settings, None
            log.info("model swapped in: %s in %.1f s", engine.info().model_name, time.monotonic() - started)
            if old is not None:
                old.retired = True
                self._retired.append(old)
                self._release_if_idle(old)
            return engine.info()

    def _require_loaded(self) -> _ServingEngine:
        if self._current is None:
            detail = f"model failed to load: {self._load_error}" if self._load_error else "model is loading"
            raise NotReadyError(detail, retry_after=LOADING_RETRY_AFTER)
        return self._current

    @contextlib.contextmanager
    def _lease(self) -> Iterator[Engine]:
        loaded = self._require_loaded()
        loaded.active += 1
        try:
            yield loaded.engine
        finally:
            loaded.active -= 1
            self._release_if_idle(loaded)

    def _release_if_idle(self, loaded: _ServingEngine) -> None:
        if loaded.retired and loaded.active == 0 and loaded in self._retired:
            self._retired.remove(loaded)
            if not loaded.owned:
                return
            log.info("shutting down the replaced engine (%s)", loaded.engine.info().model_name)
            self._spawn(loaded.engine.shutdown())

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- generation ---------------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one engine request through admission; closing the stream early aborts the engine request."""
        arrived = time.monotonic()
        self._require_loaded()  # 503 before queueing while loading
        async with self.admission.slot() as queued_s:
            self.observer.queued(queued_s)
            with self._lease() as engine:
                # aclosing: closing this stream must close the engine's at once (abort), not at garbage collection.
                async with contextlib.aclosing(self._stream(engine, request, arrived)) as chunks:
                    async for chunk in chunks:
                        yield chunk

    async def _stream(
        self, engine: Engine, request: GenerationRequest, arrived: float
    ) -> AsyncIterator[GenerationChunk]:
        self.observer.engine_step(engine.stats)  # baseline for the batch sizes this request will see
        stream = aiter(engine.generate(request))
        over = False  # the engine's stream ended by itself (finished, or raised): nothing to abort
        last_at: float | None = None
        tokens = 0
        try:
            while not over:
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    over = True
                    break
                except Exception:
                    over = True
                    raise
                now = time.monotonic()
                self.observer.engine_step(engine.stats)
                if chunk.completion_tokens > tokens:
                    if last_at is None:
                        self.observer.first_token(now - arrived)
                    else:
                        self.observer.inter_token((now - last_at) / (chunk.completion_tokens - tokens))
                    last_at, tokens = now, chunk.completion_tokens
                if chunk.finished:
                    over = True
                    self.observer.finished(chunk.prompt_tokens, chunk.completion_tokens)
                yield chunk
        finally:
            # Shielded: anyio cancel scopes (SSE responses) cancel every further await in a cancelled task.
            with anyio.CancelScope(shield=True):
                await _close(engine, stream, request.request_id, abort=not over)


async def _close(engine: Engine, stream: AsyncIterator[GenerationChunk], request_id: str, *, abort: bool) -> None:
    """Close the engine's stream (its own clean-up runs now, not at garbage collection); abort it if unfinished."""
    if abort:  # client gone or cancelled: stop the engine work
        try:
            await engine.abort(request_id)
        except Exception:
            log.exception("request %s: engine abort failed", request_id)
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.exception("request %s: closing the engine stream failed", request_id)


def _describe_load_failure(exc: BaseException) -> str:
    if isinstance(exc, EngineError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
