"""Admission and draining for the Triton model (agent.serving.triton.backend): the same limits as the FastAPI door.

Why the model admits requests itself: it is decoupled, so `execute()` hands each request to the engine and returns
at once. Triton's scheduler queue (and its `default_queue_policy { max_queue_size }`) therefore never holds a
backlog: every request is "executing" as far as Triton knows, and without this gate 400 concurrent requests are all
accepted and the last one waits minutes. Here at most MAX_CONCURRENT_REQUESTS run in the engine, at most MAX_QUEUE
wait for a slot, and the rest are refused at once (429 `overloaded`, sent as Triton's UNAVAILABLE).

Draining: when the file named by NEWBIE_TRITON_DRAIN_FILE appears (the launcher creates it just before it stops the
server) or the model is finalized, new requests are refused (503), in-flight ones get GRACEFUL_SHUTDOWN_SECONDS to
finish, and what is left is cancelled: its engine request is aborted and its client gets a final error response, so
no response sender stays open and Triton can exit without waiting out its exit timeout. A client that cancels
(closes its gRPC stream, hangs up) is noticed within a `WATCH_INTERVAL` even while its request waits for a slot.

A request counts as in flight until its final response has gone out, not until its coroutine ends: a coroutine that
ends without one (cancelled before it first ran, or a bug) is closed by the watch with a final error response
`CLOSE_AFTER` seconds later, so every accepted request gets exactly one final response on every path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.engine.errors import EngineError, NotReadyError, OverloadedError

log = logging.getLogger(__name__)

DRAIN_FILE_ENV = "NEWBIE_TRITON_DRAIN_FILE"
WATCH_INTERVAL = 0.25  # s between checks for cancelled clients, the drain file and the grace deadline
CLOSE_AFTER = 1.0  # s a request whose coroutine has ended (or was cancelled) gets to send its own final response
OVERLOADED_RETRY_AFTER = 1.0


class TrackedSender:
    """A response sender that remembers whether its final response went out (a second one would be an error) and
    tells `on_final` when it does."""

    def __init__(self, sender: Any, final_flag: int, on_final: Callable[[], None] | None = None) -> None:
        self._sender = sender
        self._final_flag = final_flag
        self._on_final = on_final
        self.finished = False
        self.checked_at = 0.0  # when is_cancelled() last asked Triton (monotonic)

    def send(self, *args: Any, **kwargs: Any) -> None:
        flags = kwargs.get("flags", args[1] if len(args) > 1 else 0)
        if self.finished:
            raise RuntimeError("the final response was already sent")
        try:
            self._sender.send(*args, **kwargs)
        finally:
            # A final send that raised is not retried: the stub closes the sender before it sends.
            if flags & self._final_flag:
                self.finished = True
                if self._on_final is not None:
                    self._on_final()

    def is_cancelled(self) -> bool:
        # Never ask after the final response: Triton has freed the response factory by then (2.51 segfaults in
        # TRITONBACKEND_ResponseFactoryIsCancelled, measured). Call on the loop thread, like every send.
        if self.finished:
            return False
        self.checked_at = time.monotonic()
        return bool(self._sender.is_cancelled())


@dataclass
class _InFlight:
    sender: TrackedSender
    future: concurrent.futures.Future[Any] | None = None
    running: bool = False
    ended_at: float | None = None  # when the watch first saw its future done with no final response sent


def _close_with_final(sender: TrackedSender, message: str) -> None:
    """The default closer: a final response with no outputs (the backend sets one that sends an error)."""
    sender.send(None, flags=sender._final_flag)


@dataclass
class RequestGate:
    """Bounded admission, cancellation watch and draining for one model instance (see the module docstring)."""

    max_running: int = 64
    max_waiting: int = 256
    grace: float = 30.0
    drain_file: Path | None = field(default_factory=lambda: _drain_file_from_env())
    # Sends the final response of a request whose coroutine ended without one: (sender, why).
    closer: Callable[[TrackedSender, str], None] = _close_with_final
    _inflight: dict[str, _InFlight] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _slots: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _accepting: bool = field(default=True, init=False, repr=False)
    _drain_deadline: float | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------------------------ any thread (execute)
    def admit(self, request_id: str, sender: TrackedSender) -> EngineError | None:
        """Count the request in, or return the error to send it at once (503 while draining, 429 when full)."""
        with self._lock:
            if not self._accepting:
                return NotReadyError("server shutting down: not accepting new requests", retry_after=1.0)
            if len(self._inflight) >= self.max_running + self.max_waiting:
                running = sum(1 for f in self._inflight.values() if f.running)
                return OverloadedError(
                    f"server busy: {running} requests generating and {len(self._inflight) - running} waiting "
                    f"(MAX_CONCURRENT_REQUESTS={self.max_running}, MAX_QUEUE={self.max_waiting})",
                    retry_after=OVERLOADED_RETRY_AFTER,
                )
            self._inflight[request_id] = _InFlight(sender)
        return None

    def track(self, request_id: str, future: concurrent.futures.Future[Any]) -> None:
        """The scheduled request's future (cancelled by the watch when its client goes or the grace runs out). The
        request stays counted until its final response is out (`forget`, from its sender's `on_final`)."""
        with self._lock:
            entry = self._inflight.get(request_id)
            if entry is not None:
                entry.future = future

    def forget(self, request_id: str) -> None:
        """Its final response went out."""
        with self._lock:
            self._inflight.pop(request_id, None)

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    @property
    def drained(self) -> bool:
        """Draining, and every accepted request has had its final response."""
        with self._lock:
            return not self._accepting and not self._inflight

    def stop_accepting(self, grace: float | None = None) -> None:
        """Refuse new requests from now on; in-flight ones are cancelled after `grace` s (default: self.grace)."""
        with self._lock:
            if self._accepting:
                log.info("draining: %d request(s) in flight, %.0f s to finish", len(self._inflight), self.grace)
            self._accepting = False
            deadline = time.monotonic() + (self.grace if grace is None else grace)
            self._drain_deadline = min(self._drain_deadline or deadline, deadline)

    def drain(self, timeout: float) -> int:
        """Block (not on the loop thread) until nothing is in flight, at most `timeout` s; returns what is left."""
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.inflight

    # ------------------------------------------------------------------------------------------- loop thread
    async def run(self, request_id: str, serve: Callable[[], Awaitable[None]]) -> None:
        """Wait for a generation slot, then serve; the slot is freed however the request ends."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
        async with self._slots:
            with self._lock:
                entry = self._inflight.get(request_id)
                if entry is not None:
                    entry.running = True
            await serve()

    async def watch(self) -> None:
        """Forever: cancel requests whose client is gone, start draining when the drain file appears, and cancel
        what is left when the grace period is over."""
        while True:
            try:
                self._watch_once()
            except Exception:  # the watch must outlive any one bad sender
                log.exception("request watch failed")
            await asyncio.sleep(WATCH_INTERVAL)

    def _watch_once(self) -> None:
        if self._accepting and self.drain_file is not None and self.drain_file.exists():
            self.stop_accepting()
        now = time.monotonic()
        with self._lock:
            entries = list(self._inflight.items())
            overdue = self._drain_deadline is not None and now >= self._drain_deadline
        for request_id, entry in entries:
            if entry.future is None or entry.sender.finished:
                continue
            if entry.future.done():
                # Its coroutine ended (or was cancelled, perhaps before it ever ran) without a final response:
                # give it CLOSE_AFTER to send its own, then close it, so that no response sender stays open.
                entry.ended_at = entry.ended_at or now
                if now - entry.ended_at >= CLOSE_AFTER:
                    log.warning("request %s ended without a final response: closing it", request_id)
                    try:
                        self.closer(entry.sender, "the request was cancelled")
                    except Exception:  # the client is gone: nothing left to tell it (the sender is closed anyway)
                        log.debug("closing request %s failed", request_id, exc_info=True)
                    self.forget(request_id)
                continue
            if overdue:
                log.info("request %s did not finish within the grace period: cancelled", request_id)
                entry.future.cancel()
            elif now - entry.sender.checked_at >= WATCH_INTERVAL and entry.sender.is_cancelled():
                # (Each ask is a round trip to the server: a request that its stream asked about since the last
                # tick, as running ones do between tokens, is not asked again.)
                log.info("request %s: client cancelled, request dropped", request_id)
                entry.future.cancel()


def instance_marker(drain_file: Path, state: str, pid: int | None = None) -> Path:
    """Beside the drain file, one model instance's state: `live` from initialize until Triton finalizes it, `done`
    once it has drained and stopped its engine (the launcher reads them: `instances_drained`, `instances_live`)."""
    return drain_file.with_name(f"instance-{pid or os.getpid()}.{state}")


def instances_live(drain_file: Path) -> bool:
    """Some model instance has not been finalized yet."""
    return any(drain_file.parent.glob("instance-*.live"))


def instances_drained(drain_file: Path) -> bool:
    """Every live model instance has drained (each request had its final response) and stopped its engine."""
    live = {p.name.rsplit(".", 1)[0] for p in drain_file.parent.glob("instance-*.live")}
    done = {p.name.rsplit(".", 1)[0] for p in drain_file.parent.glob("instance-*.done")}
    return bool(live) and live <= done


def _drain_file_from_env() -> Path | None:
    raw = os.environ.get(DRAIN_FILE_ENV, "").strip()
    return Path(raw) if raw else None
