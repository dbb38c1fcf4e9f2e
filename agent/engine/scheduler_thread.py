"""The background-thread lifecycle the engines' schedulers share (transformers: hf_scheduler, ONNX: onnx_scheduler).

Each scheduler runs its loop in `_run` on one daemon thread; other threads hand it work under `_cond` and wake it
with `notify()`; `stop()` sets `_stopping`, wakes it and waits for the loop to end (the loop aborts what is left).
"""

from __future__ import annotations

import threading


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
