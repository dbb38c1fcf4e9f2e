"""The ONNX engine's scheduler: concurrent requests share decode steps in cohorts of `og.Generator` batches.

What onnxruntime-genai 0.18 offers (read from its API and tried here, see docs/onnx.md):
- `og.Engine` + `Request.begin_turn` + `Engine.run(event_buffer)` is its continuous-batching engine. True continuous
  batching (`engine.dynamic_batching`) needs a PagedAttention model, which the builder makes only for CUDA (fp16/bf16)
  and WebGPU. On CPU it falls back to its *static* scheduler: waves of at most 4 requests (hard-coded), a wave must
  finish before the next starts; 8 requests ran at 29-60 tok/s against 65-69 for one `og.Generator` (same run).
- `og.Generator` batches any number of sequences but takes its input once (`append_tokens` only once for batch > 1):
  rows cannot be added to, or removed from, a running generator.

So this scheduler batches in cohorts: waiting requests are admitted at the next step as a new cohort (a new request
waits at most one step of each running cohort, never for a whole wave), cohorts are stepped round-robin, and
cohorts are re-formed by re-prefilling (prompt + tokens generated so far) when that is cheap:
- on admission, running cohorts whose live rows fit `merge_tokens` are absorbed into the new cohort, so requests that
  arrive a few milliseconds apart end up sharing one forward batch;
- a cohort at least half of whose rows have finished is compacted (finished rows still cost compute in a
  generator), again within `merge_tokens`.
Tokens are chosen per row (agent.engine.onnx_sampling), so a re-prefilled request continues exactly where it was.
The loop runs on its own thread (onnxruntime releases the GIL); results go back through each sequence's sink.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.engine.detokenize import StopMatcher
from agent.engine.onnx_sampling import choose_token
from agent.engine.types import EngineStats, FinishReason, GenerationChunk, SamplingParams

log = logging.getLogger(__name__)

Sink = Callable[[GenerationChunk | BaseException], None]


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler: its prompt, what it generated so far, and where its chunks go."""

    request_id: str
    prompt_ids: np.ndarray
    sampling: SamplingParams
    max_new_tokens: int
    sink: Sink
    stream: Any  # og.TokenizerStream: incremental detokenizer
    eos_ids: frozenset[int]
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    on_finish: Callable[[], None] | None = None  # runs before the final chunk is sent (keeps stats exact)

    def __post_init__(self) -> None:
        self._stops = StopMatcher(self.sampling.stop)
        self.min_new_tokens = self.max_new_tokens if self.sampling.ignore_eos else 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_logits(self) -> bool:
        """False when onnxruntime-genai's own greedy choice is exactly what this row wants (the fast path)."""
        return not self.sampling.greedy or len(self.generated) < self.min_new_tokens

    def banned_tokens(self) -> tuple[int, ...]:
        return tuple(self.eos_ids) if len(self.generated) < self.min_new_tokens else ()

    def input_ids(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, np.asarray(self.generated, dtype=np.int32)])

    def accept(self, token: int) -> None:
        """Take one generated token: stream its text, and finish on EOS, a stop string or the length limit."""
        self.generated.append(token)
        count = len(self.generated)
        if token in self.eos_ids and count > self.min_new_tokens:
            self.finish("stop", self._stops.flush())
            return
        text = self._stops.feed(self.stream.decode(token))
        stopped = self._stops.stopped
        if stopped:
            self.finish("stop", text)
        elif count >= self.max_new_tokens:
            self.finish("length", text + self._stops.flush())
        elif text:
            self._emit(text, None)

    def finish(self, reason: FinishReason, text: str = "") -> None:
        if not self.finished:
            self.finish_reason = reason
            if self.on_finish is not None:
                self.on_finish()
            self._emit(text, reason)

    def fail(self, exc: BaseException) -> None:
        if not self.finished:
            self.finish_reason = "error"
            if self.on_finish is not None:
                self.on_finish()
            self.sink(exc)

    def _emit(self, text: str, reason: FinishReason | None) -> None:
        self.sink(GenerationChunk(self.request_id, text, len(self.prompt_ids), len(self.generated), reason))


class Cohort:
    """One `og.Generator` over a fixed set of sequences (right-padded, prefilled on creation)."""

    def __init__(self, og: Any, model: Any, seqs: list[Sequence], pad_id: int, context_length: int) -> None:
        self.rows = seqs
        inputs = [s.input_ids() for s in seqs]
        width = max(len(ids) for ids in inputs)
        batch = np.full((len(seqs), width), pad_id, dtype=np.int32)
        for i, ids in enumerate(inputs):
            batch[i, : len(ids)] = ids
        remaining = max(s.max_new_tokens - len(s.generated) for s in seqs)
        params = og.GeneratorParams(model)
        # The KV cache is allocated for max_length up front: size it to this cohort's real need.
        params.set_search_options(
            do_sample=False, batch_size=len(seqs), max_length=min(width + remaining, context_length)
        )
        self.generator = og.Generator(model, params)
        self.generator.append_tokens(batch)
        self.max_length = min(width + remaining, context_length)

    @property
    def size(self) -> int:
        return len(self.rows)

    def live(self) -> list[Sequence]:
        return [s for s in self.rows if not s.finished]

    def step(self) -> None:
        """One decode step for every row; finished rows ride along (a generator cannot drop rows)."""
        live = self.live()
        if any(s.needs_logits for s in live):
            # Edited in place and handed back: og's greedy choice then takes each row's token. A greedy row only
            # loses its banned ids; a sampled row keeps just the token chosen here. (A whole-batch copy per step
            # was ~1 ms at 32 rows; these edits are µs.)
            logits = self.generator.get_logits()
            if not logits.flags.writeable:
                logits = logits.copy()
            for i, s in enumerate(self.rows):
                if s.finished or not s.needs_logits:
                    continue
                row = logits[i, -1]
                if s.sampling.greedy:
                    row[list(s.banned_tokens())] = -np.inf
                else:
                    token = choose_token(row, s.sampling, s.rng, s.banned_tokens())
                    row.fill(-np.inf)
                    row[token] = 0.0
            self.generator.set_logits(logits)
        self.generator.generate_next_token()
        tokens = self.generator.get_next_tokens()
        for i, s in enumerate(self.rows):
            if not s.finished:
                s.accept(int(tokens[i]))
        if self.generator.is_done():  # the context length ran out before the requests' own limits
            for s in self.live():
                s.finish("length")

    def rebuild_cost(self) -> int:
        """Tokens a re-prefill of the live rows would process."""
        return sum(len(s.prompt_ids) + len(s.generated) for s in self.live())


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_size: int = 32  # rows decoded together, over all cohorts
    kv_budget_bytes: int = 2 << 30  # KV cache preallocated by all cohorts together
    kv_bytes_per_token: int = 0  # per row and position; 0 disables the KV budget
    merge_tokens: int = 1024  # largest re-prefill spent on merging or compacting cohorts
    context_length: int = 8192


class CohortScheduler:
    """Admits, steps, merges and retires cohorts on one background thread."""

    def __init__(self, og: Any, model: Any, *, pad_id: int, limits: SchedulerLimits, stats: EngineStats) -> None:
        self._og, self._model, self._pad_id = og, model, pad_id
        self.limits = limits
        self.stats = stats
        self.waiting: deque[Sequence] = deque()
        self.cohorts: list[Cohort] = []
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="onnx-scheduler", daemon=True)

    # --- called from other threads ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
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

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the scheduler thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._next_batch_of_work():
                self._admit()
                for cohort in list(self.cohorts):
                    self._step(cohort)
                self._update_stats()
        except BaseException as exc:  # a bug: fail every request rather than leave clients hanging
            log.exception("ONNX scheduler crashed")
            self._fail_all(exc)
        finally:
            self._abort_all()

    def _next_batch_of_work(self) -> bool:
        """Wait for work; move the inbox and aborts into scheduler state. False once stopping."""
        with self._cond:
            while not (self._stopping or self._inbox or self._aborts or self.cohorts or self.waiting):
                self._cond.wait()
            if self._stopping:
                return False
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, set()
        for seq in [s for s in self.waiting if s.request_id in aborts]:
            self.waiting.remove(seq)
            seq.finish("abort")
        for cohort in self.cohorts:
            for seq in cohort.live():
                if seq.request_id in aborts:
                    seq.finish("abort")
        self._retire_finished()
        return True

    def _admit(self) -> None:
        """Start a cohort for waiting requests now, absorbing small running cohorts whose re-prefill is cheap."""
        if not self.waiting:
            return
        absorbed = self._cheap_cohorts()
        kept = [c for c in self.cohorts if c not in absorbed]
        seqs = [s for c in absorbed for s in c.live()]
        rows_left = self.limits.max_batch_size - sum(c.size for c in kept)
        kv_left = self.limits.kv_budget_bytes - sum(self._kv_bytes(c.size, c.max_length) for c in kept)
        admitted = 0
        while self.waiting and len(seqs) < rows_left:
            # Over the KV budget only a lone request may start (so one long request can always run).
            if (seqs or kept) and self._kv_bytes_for([*seqs, self.waiting[0]]) > kv_left:
                break
            seqs.append(self.waiting.popleft())
            admitted += 1
        if admitted:
            self._replace(absorbed, seqs)

    def _cheap_cohorts(self) -> list[Cohort]:
        picked: list[Cohort] = []
        budget = self.limits.merge_tokens
        for cohort in sorted(self.cohorts, key=Cohort.rebuild_cost):
            cost = cohort.rebuild_cost()
            if cost > budget:
                break
            picked.append(cohort)
            budget -= cost
        return picked

    def _step(self, cohort: Cohort) -> None:
        try:
            cohort.step()
        except Exception as exc:
            log.exception("ONNX generator step failed")
            for seq in cohort.live():
                seq.fail(exc)
        self.stats.record_step(cohort.size)
        live = cohort.live()
        if not live:
            self.cohorts.remove(cohort)
        elif len(live) * 2 <= cohort.size and cohort.rebuild_cost() <= self.limits.merge_tokens:
            self._replace([cohort], live)  # compaction: stop paying for finished rows

    def _replace(self, old: list[Cohort], seqs: list[Sequence]) -> None:
        for cohort in old:
            self.cohorts.remove(cohort)
        log.debug(
            "new cohort: %d rows (%d from %d merged cohorts), %d tokens to prefill",
            len(seqs),
            sum(len(c.live()) for c in old),
            len(old),
            sum(len(s.input_ids()) for s in seqs),
        )
        try:
            self.cohorts.append(Cohort(self._og, self._model, seqs, self._pad_id, self.limits.context_length))
        except Exception as exc:
            log.exception("ONNX prefill failed")
            for seq in seqs:
                seq.fail(exc)

    def _kv_bytes(self, rows: int, max_length: int) -> int:
        return rows * max_length * self.limits.kv_bytes_per_token

    def _kv_bytes_for(self, seqs: list[Sequence]) -> int:
        width = max(len(s.prompt_ids) + len(s.generated) for s in seqs)
        remaining = max(s.max_new_tokens - len(s.generated) for s in seqs)
        return self._kv_bytes(len(seqs), min(width + remaining, self.limits.context_length))

    def _retire_finished(self) -> None:
        self.cohorts = [c for c in self.cohorts if c.live()]

    def _update_stats(self) -> None:
        """Recount from the scheduler's state (a finishing sequence calls this before its last chunk goes out)."""
        self.stats.running = sum(len(c.live()) for c in self.cohorts)
        self.stats.waiting = len(self.waiting) + len(self._inbox)

    def _fail_all(self, exc: BaseException) -> None:
        for seq in [*self.waiting, *(s for c in self.cohorts for s in c.live())]:
            seq.fail(exc)

    def _abort_all(self) -> None:
        with self._cond:
            self._stopping = True
            pending = [*self._inbox, *self.waiting, *(s for c in self.cohorts for s in c.live())]
            self._inbox.clear()
        for seq in pending:
            seq.finish("abort")
        self.waiting.clear()
        self.cohorts.clear()
        self._update_stats()
