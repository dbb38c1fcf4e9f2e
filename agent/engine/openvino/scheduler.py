"""The OpenVINO engine's scheduler thread: drives ContinuousBatchingPipeline's add_request / step loop.

OpenVINO GenAI's ContinuousBatchingPipeline does the batching itself (paged attention, prefix caching, split-fuse
prefill: a new prompt is prefilled in the same step as the running requests' decode). What it leaves to the caller
is the loop: `add_request` returns a GenerationHandle, each `step()` runs one forward pass over every scheduled
request, and `handle.read()` returns the tokens produced since the last read. This thread owns the pipeline (it is
not safe to call from several threads at once); other threads hand it requests and aborts under `_cond`.

End-of-stream is decided here, not by the pipeline, so every engine stops the same way: requests run with
`ignore_eos` and the request's `max_new_tokens`, and each token goes through `OvSequence.accept` (EOS unless
`ignore_eos` asked for exactly `max_new_tokens`, stop strings through the shared StopMatcher, length); a finished
or aborted request is stopped in the pipeline before its next step, which frees its KV blocks.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.engine.detokenize import StopMatcher
from agent.engine.errors import InvalidRequestError
from agent.engine.scheduler_thread import InboxSchedulerThread, StreamedSequence
from agent.engine.types import EngineStats, FinishReason, GenerationChunk, SamplingParams

log = logging.getLogger(__name__)

Sink = Callable[[GenerationChunk | BaseException], None]


@dataclass(eq=False)
class OvSequence(StreamedSequence):
    """One request: what to add to the pipeline, what it generated so far, and where its chunks go.

    `prompt` is either token ids (text models: our tokenizer's ids, the same as every other engine) or a rendered
    prompt string with images (vision models: the pipeline's own image preprocessing and placeholder expansion)."""

    request_id: str
    prompt: Any  # openvino.Tensor of ids, or str
    images: list[Any]  # openvino.Tensor images (vision prompts only)
    prompt_tokens: int
    sampling: SamplingParams
    max_new_tokens: int
    sink: Sink
    detokenizer: Any  # agent.engine.detokenize.IncrementalDetokenizer
    eos_ids: frozenset[int]
    config: Any  # openvino_genai.GenerationConfig
    generated: int = 0
    finish_reason: FinishReason | None = None
    on_finish: Callable[[], None] | None = None
    handle: Any = None
    _stops: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self._stops = StopMatcher(self.sampling.stop)
        self.min_new_tokens = self.max_new_tokens if self.sampling.ignore_eos else 0

    def accept(self, token: int) -> None:
        """Take one generated token: stream its text; finish on EOS, a stop string or the length limit."""
        self.generated += 1
        self._stream(token, self.generated)

    def _counts(self) -> tuple[int, int]:
        return self.prompt_tokens, self.generated


class OvScheduler(InboxSchedulerThread):
    """Adds, steps, streams and retires requests of one ContinuousBatchingPipeline on a background thread."""

    def __init__(self, pipeline: Any, *, stats: EngineStats) -> None:
        self.pipeline = pipeline
        self.stats = stats
        self.active: dict[int, OvSequence] = {}  # pipeline request id -> sequence
        self._ids = itertools.count()
        super().__init__("openvino-scheduler")

    # --- the scheduler thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._take_work():
                if self.active:
                    self._step()
                self._update_stats()
        except BaseException as exc:  # a bug: fail every request rather than leave clients hanging
            log.exception("OpenVINO scheduler crashed")
            for seq in [*self.active.values(), *self._inbox]:
                seq.fail(exc)
        finally:
            self._abort_all()

    def _take_work(self) -> bool:
        """Wait for work; add new requests to the pipeline and apply aborts. False once stopping."""
        with self._cond:
            while not (self._stopping or self._inbox or self._aborts or self.active):
                self._cond.wait()
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for seq in inbox:
            if seq.request_id in aborts:
                seq.finish("abort")
            else:
                self._add(seq)
        for seq in list(self.active.values()):
            if seq.request_id in aborts:
                seq.finish("abort")
        self._retire_finished()
        return True

    def _add(self, seq: OvSequence) -> None:
        rid = next(self._ids)
        try:
            if seq.images or isinstance(seq.prompt, str):
                seq.handle = self.pipeline.add_request(rid, seq.prompt, seq.images, seq.config)
            else:
                seq.handle = self.pipeline.add_request(rid, seq.prompt, seq.config)
        except Exception as exc:  # the pipeline refused this request (e.g. an image it cannot preprocess)
            log.exception("OpenVINO add_request failed")
            seq.fail(exc)
            return
        self.active[rid] = seq

    def _step(self) -> None:
        """One pipeline step (prefill chunks and decodes together), then stream every request's new tokens."""
        try:
            self.pipeline.step()
        except Exception as exc:
            log.exception("OpenVINO pipeline step failed")
            for seq in self.active.values():
                seq.fail(exc)
            self._retire_finished()
            return
        produced = 0
        for seq in self.active.values():
            tokens = self._read(seq)
            produced += bool(tokens)
            for token in tokens:
                seq.accept(token)
                if seq.finished:
                    break
            if not seq.finished and _done(seq.handle):
                if _ignored(seq.handle):  # the pipeline could not schedule it: the prompt exceeds its KV cache
                    seq.fail(
                        InvalidRequestError(
                            f"prompt of {seq.prompt_tokens} tokens does not fit the OpenVINO KV cache "
                            "(OPENVINO_KV_CACHE_MB)"
                        )
                    )
                else:  # the pipeline ended it (max_new_tokens reached on its side): never leave it hanging
                    seq.finish("length")
        if produced:
            self.stats.record_step(produced)
        self._retire_finished()

    @staticmethod
    def _read(seq: OvSequence) -> list[int]:
        if not seq.handle.can_read():
            return []
        outputs = seq.handle.read()
        return [int(t) for out in outputs.values() for t in out.generated_ids]

    def _retire_finished(self) -> None:
        for rid in [rid for rid, seq in self.active.items() if seq.finished]:
            seq = self.active.pop(rid)
            if not _done(seq.handle):
                # stop() ends it in the pipeline before the next step and keeps its blocks for the prefix cache.
                seq.handle.stop()

    def _update_stats(self) -> None:
        """Recount from the scheduler's state (a finishing sequence calls this before its last chunk goes out)."""
        self.stats.running = sum(1 for s in self.active.values() if not s.finished)
        self.stats.waiting = len(self._inbox)

    def _abort_all(self) -> None:
        with self._cond:
            self._stopping = True
            pending = [*self._inbox, *self.active.values()]
            self._inbox.clear()
        for seq in pending:
            seq.finish("abort")
        self._retire_finished()
        self._update_stats()
        self._release_stopped()

    def _release_stopped(self) -> None:
        """One last step, so the pipeline frees the KV blocks of the requests just stopped: a pipeline destroyed
        while it still holds them logs "BlockManager leaked sequence block tables" (harmless, but an error line
        on every shutdown with a stream open). Stopped requests are only cleaned up; nothing is computed."""
        try:
            if self.pipeline.has_non_finished_requests():
                self.pipeline.step()
        except Exception:  # a pipeline broken by a crash above: there is nothing left to free
            log.debug("OpenVINO pipeline could not release stopped requests", exc_info=True)


def _ignored(handle: Any) -> bool:
    import openvino_genai as ov_genai

    return handle.get_status() == ov_genai.GenerationStatus.IGNORED


def _done(handle: Any) -> bool:
    import openvino_genai as ov_genai

    return handle.get_status() != ov_genai.GenerationStatus.RUNNING
