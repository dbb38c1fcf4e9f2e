"""The background-thread lifecycle the engines' schedulers share (transformers, ONNX, OpenVINO).

Each scheduler runs its loop in `_run` on one daemon thread; other threads hand it work under `_cond` and wake it
with `notify()`; `stop()` sets `_stopping`, wakes it and waits for the loop to end (the loop aborts what is left).
"""

from __future__ import annotations

import threading
from typing import Any


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
