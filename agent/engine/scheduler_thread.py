"""The background-thread lifecycle the engines' schedulers share (transformers, ONNX, OpenVINO), and the streaming
end of a sequence the ONNX and OpenVINO schedulers share.

Each scheduler runs its loop in `_run` on one daemon thread; other threads hand it work under `_cond` and wake it
with `notify()`; `stop()` sets `_stopping`, wakes it and waits for the loop to end (the loop aborts what is left).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from agent.engine.detokenize import StopMatcher
from agent.engine.types import FinishReason, GenerationChunk


class SchedulerThread:
    def __init__(self, name: str) -> None:
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything and end the thread (blocking, up to `timeout` seconds)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError


class InboxSchedulerThread(SchedulerThread):
    """A SchedulerThread fed through an inbox (ONNX, OpenVINO): other threads `submit` sequences and `abort` request
    ids under `_cond`; the loop takes both out. Subclasses set `self.stats` and define `_update_stats`, which each
    sequence calls when it finishes."""

    def __init__(self, name: str) -> None:
        self._inbox: list[Any] = []
        self._aborts: set[str] = set()
        super().__init__(name)

    # --- called from other threads ------------------------------------------------------------------------------
    def submit(self, seq: Any) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("scheduler stopped")
            seq.on_finish = self._update_stats
            self._inbox.append(seq)
            self.stats.waiting += 1
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def _update_stats(self) -> None:
        raise NotImplementedError


class StreamedSequence:
    """How a sequence (ONNX, OpenVINO) streams a token's text and finishes. A dataclass subclass provides the
    attributes annotated here (annotations of a plain base are not dataclass fields) and `_counts()` -> (prompt
    tokens, completion tokens)."""

    request_id: str
    sink: Callable[[GenerationChunk | BaseException], None]
    detokenizer: Any  # agent.engine.detokenize.IncrementalDetokenizer
    eos_ids: frozenset[int]
    max_new_tokens: int
    min_new_tokens: int
    finish_reason: FinishReason | None
    on_finish: Callable[[], None] | None
    _stops: StopMatcher

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _stream(self, token: int, count: int) -> None:
        """The `count`-th generated `token`: finish on EOS, a stop string or the length limit, else stream its text."""
        if token in self.eos_ids and count > self.min_new_tokens:
            self.finish("stop", self._stops.flush())
            return
        text = self._stops.feed(self.detokenizer.push(token))
        if self._stops.stopped:
            self.finish("stop", text)
        elif count >= self.max_new_tokens:
            self.finish("length", text + self._stops.flush())
        elif text:
            self._emit(text, None)

    def finish(self, reason: FinishReason, text: str = "") -> None:
        if self._end(reason):
            self._emit(text, reason)

    def fail(self, exc: BaseException) -> None:
        if self._end("error"):
            self.sink(exc)

    def _end(self, reason: FinishReason) -> bool:
        """Record how the sequence ended (False if it already had); `on_finish` runs before the last chunk goes."""
        if self.finished:
            return False
        self.finish_reason = reason
        if self.on_finish is not None:
            self.on_finish()
        return True

    def _counts(self) -> tuple[int, int]:
        raise NotImplementedError

    def _emit(self, text: str, reason: FinishReason | None) -> None:
        prompt, completion = self._counts()
        self.sink(GenerationChunk(self.request_id, text, prompt, completion, reason))
