"""The ONNX engine's scheduler: continuous batching over the KV pool, with a prefix cache.

What onnxruntime-genai 0.18 offers for this (read from its API and tried here, see docs/onnx.md): `og.Engine`'s
continuous batching needs a PagedAttention model, which its builder makes only for CUDA and WebGPU (on CPU it runs
static waves of at most 4 requests), and an `og.Generator` takes its batch once (rows can neither join nor leave).
So the engine keeps onnxruntime-genai for what it does well, building the model, and runs the built decoder itself
(agent.engine.onnx.runner) over its own KV cache (agent.engine.onnx.kv):

- each running sequence owns a row of the KV pool; one decode step runs every running row (rows at different
  lengths: GroupQueryAttention takes each row's length from the attention mask);
- a waiting request joins at the next step: its prompt is prefilled into a free row (copying the longest cached
  prefix first, so only the rest is computed), it streams its first token, and it decodes with the others from the
  next step on. Prefills run one row at a time (GroupQueryAttention's limit with a cache behind the new tokens);
  at most `prefill_tokens` prompt tokens are prefilled between two decode steps, a long prompt in chunks over
  several steps, so running streams keep flowing;
- a finished or aborted sequence leaves at once: the last row moves into its place;
- tokens are chosen per row in numpy (agent.engine.onnx.sampling): requests with different sampling settings share
  a step, and a seeded request draws from its own random stream;
- structured-output rows: a greedy row's argmax is checked against its grammar (one token's check) and its mask
  (agent.engine.structured.grammar) is filled only when the grammar refuses that token; a sampled row's mask is
  filled on a worker thread while onnxruntime runs the step's forward pass (both release the GIL; a row's grammar
  state only changes after the step).
The loop runs on its own thread (onnxruntime releases the GIL); results go back through each sequence's sink.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.engine.detokenize import StopMatcher
from agent.engine.onnx.kv import KvPool, PrefixCache
from agent.engine.onnx.runner import DecoderRunner
from agent.engine.onnx.sampling import choose_token
from agent.engine.scheduler_thread import InboxSchedulerThread, StreamedSequence
from agent.engine.structured.grammar import GrammarState, RowMasks, apply_row_masks, fill_masks
from agent.engine.types import EngineStats, FinishReason, GenerationChunk, SamplingParams

log = logging.getLogger(__name__)

Sink = Callable[[GenerationChunk | BaseException], None]
_MIN_CHUNK = 32  # a new prefill starts only with at least this much of the step's prefill budget left


@dataclass(eq=False)
class OnnxSequence(StreamedSequence):
    """One request inside the scheduler: its prompt, what it generated so far, and where its chunks go."""

    request_id: str
    prompt_ids: np.ndarray
    sampling: SamplingParams
    max_new_tokens: int
    sink: Sink
    detokenizer: Any  # agent.engine.detokenize.IncrementalDetokenizer
    eos_ids: frozenset[int]
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    on_finish: Callable[[], None] | None = None  # runs before the final chunk is sent (keeps stats exact)
    cached: int = 0  # tokens of this sequence in its KV row
    grammar: GrammarState | None = None  # structured output: the request's matcher (agent.engine.structured)

    def __post_init__(self) -> None:
        self._stops = StopMatcher(self.sampling.stop)
        # A grammar decides itself when the end token may come (ignore_eos cannot outlast a completed grammar).
        self.min_new_tokens = self.max_new_tokens if self.sampling.ignore_eos and self.grammar is None else 0

    @property
    def tokens_needed(self) -> int:
        """KV positions this sequence can reach: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_new_tokens

    def banned_tokens(self) -> tuple[int, ...]:
        return tuple(self.eos_ids) if len(self.generated) < self.min_new_tokens else ()

    def accept(self, token: int) -> None:
        """Take one generated token: stream its text, and finish on EOS, a stop string or the length limit."""
        self.generated.append(token)
        count = len(self.generated)
        if self.grammar is not None and not self.grammar.accept(token):
            log.error("request %s: token %d is outside its grammar; ending it", self.request_id, token)
            self.finish("stop", self._stops.flush())
            return
        self._stream(token, count)

    def _counts(self) -> tuple[int, int]:
        return len(self.prompt_ids), len(self.generated)


def choose_tokens(
    logits: np.ndarray,
    seqs: list[OnnxSequence],
    masks: RowMasks | concurrent.futures.Future[RowMasks | None] | None = None,
) -> list[int]:
    """One token per row of `logits` ([n, vocab], edited in place): argmax for greedy rows (over the whole batch at
    once), per-row sampling for the others; banned ids (EOS before a minimum length) are never chosen, nor tokens
    the rows' grammars forbid. `masks` holds the sampled constrained rows' masks (filled already, or being filled;
    filled here when not given). A greedy constrained row's mask is filled only when its grammar forbids the row's
    argmax: when the grammar allows the best token, masking the others cannot change the choice."""
    for i, seq in enumerate(seqs):
        banned = seq.banned_tokens()
        if banned:
            logits[i, list(banned)] = -np.inf
    if isinstance(masks, concurrent.futures.Future):
        masks = masks.result()
    elif masks is None:
        masks = fill_masks([None if s.sampling.greedy else s.grammar for s in seqs])
    apply_row_masks(logits, masks)  # sampled structured-output rows (and any row the caller filled)
    tokens = np.argmax(logits, axis=-1).tolist()
    refused = [
        s.grammar if s.grammar is not None and s.sampling.greedy and not s.grammar.allows(tokens[i]) else None
        for i, s in enumerate(seqs)
    ]
    later = fill_masks(refused)
    if later is not None:
        apply_row_masks(logits, later)
        for i in later.rows:
            tokens[i] = int(np.argmax(logits[i]))
    for i, seq in enumerate(seqs):
        if not seq.sampling.greedy:
            tokens[i] = choose_token(logits[i], seq.sampling, seq.rng)
    return tokens


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_size: int = 32  # sequences decoded together
    kv_budget_bytes: int = 2 << 30  # the KV pool's size limit (a lone request is always admitted)
    prefill_tokens: int = 512  # prompt tokens prefilled between two decode steps (at least one prompt)


class OnnxScheduler(InboxSchedulerThread):
    """Admits, prefills, decodes and retires sequences on one background thread."""

    def __init__(self, runner: DecoderRunner, prefixes: PrefixCache, *, limits: SchedulerLimits, stats: EngineStats):
        self.runner = runner
        self.pool: KvPool = runner.pool
        self.prefixes = prefixes
        self.limits = limits
        self.stats = stats
        self.waiting: deque[OnnxSequence] = deque()
        self.running: list[OnnxSequence] = []  # running[i] owns pool row i
        self.prefilling: OnnxSequence | None = None  # a prompt being prefilled in chunks, in row len(running)
        # Fills grammar masks during the forward pass (one thread: one step's masks at a time; llguidance spreads a
        # batch's rows over its own native threads).
        self._masker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="onnx-grammar-masks")
        super().__init__("onnx-scheduler")

    # --- the scheduler thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._next_batch_of_work():
                self._admit()
                if self.running:
                    self._decode()
                self._update_stats()
        except BaseException as exc:  # a bug: fail every request rather than leave clients hanging
            log.exception("ONNX scheduler crashed")
            self._fail_all(exc)
        finally:
            self._abort_all()

    def _next_batch_of_work(self) -> bool:
        """Wait for work; move the inbox and aborts into scheduler state. False once stopping."""
        with self._cond:
            while not (self._stopping or self._inbox or self._aborts or self._pending()):
                self.pool.release()  # idle: give the KV memory back
                self._cond.wait()
            if self._stopping:
                return False
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, set()
        if aborts:
            for seq in [s for s in self.waiting if s.request_id in aborts]:
                self.waiting.remove(seq)
                seq.finish("abort")
            for seq in self.running:
                if seq.request_id in aborts:
                    seq.finish("abort")
            if self.prefilling is not None and self.prefilling.request_id in aborts:
                self.prefilling.finish("abort")
                self.prefilling = None  # its row is the last one: nothing to move
            self._retire_finished()
        return True

    def _admit(self) -> None:
        """Prefill waiting requests into the row after the running ones, within the slot, KV and per-step prefill
        budgets. A prompt longer than the budget is prefilled a chunk per step (`self.prefilling`, one at a time),
        so the running streams keep getting tokens while it fills."""
        budget = budget_limit = self.limits.prefill_tokens
        while budget > 0:
            if self.prefilling is None and (budget < min(_MIN_CHUNK, budget_limit) or not self._start_next()):
                return
            budget -= self._prefill_chunk(budget)

    def _start_next(self) -> bool:
        """Give the next waiting request a row (and its cached prefix); False when none can start now."""
        if not self.waiting or len(self.running) >= self.limits.max_batch_size:
            return False
        seq = self.waiting[0]
        tokens = max(s.tokens_needed for s in [*self.running, seq])
        if self.running and self.pool.bytes_for(len(self.running) + 1, tokens) > self.limits.kv_budget_bytes:
            return False  # wait for memory; a lone request always starts
        self.waiting.popleft()
        row = len(self.running)
        self.pool.ensure(row + 1, tokens, keep=(row, max((s.cached for s in self.running), default=0)))
        kv, reused = self.prefixes.lookup(seq.prompt_ids)
        if reused:
            self.pool.write(row, kv, reused)
        seq.cached = reused
        self.stats.prefix_cached_tokens += reused
        self.prefilling = seq
        return True

    def _prefill_chunk(self, budget: int) -> int:
        """Run up to `budget` more prompt tokens of `self.prefilling`; at its end, it joins the running batch with
        its first token. Returns the tokens computed."""
        seq, row = self.prefilling, len(self.running)
        if seq is None:  # `_admit` starts one first: reaching here without one is a scheduler bug
            raise RuntimeError("prefill step with no request prefilling")
        prompt = seq.prompt_ids
        end = min(len(prompt), seq.cached + budget)
        done = end - seq.cached
        try:
            logits = self.runner.forward(
                slice(row, row + 1), prompt[None, seq.cached : end], np.ones((1, end), dtype=np.int64)
            )
        except Exception as exc:
            log.exception("ONNX prefill failed")
            self.prefilling = None
            seq.fail(exc)
            return done
        seq.cached = end
        self.stats.record_step(1)
        if end < len(prompt):
            return done
        self.prefilling = None
        self.running.append(seq)
        seq.accept(choose_tokens(logits, [seq])[0])  # the first token goes out before the prompt's KV is copied
        self.prefixes.store(prompt, lambda n: self.pool.read(row, n))
        if seq.finished:
            self._retire_finished()
        return done

    def _decode(self) -> None:
        """One step for every running sequence."""
        seqs = self.running
        cached = np.fromiter((s.cached for s in seqs), dtype=np.int64, count=len(seqs))
        # Row i has cached[i] tokens plus this one: that many ones (GroupQueryAttention reads the sum).
        mask = (np.arange(int(cached.max()) + 1)[None, :] <= cached[:, None]).astype(np.int64)
        last = np.fromiter((s.generated[-1] for s in seqs), dtype=np.int64, count=len(seqs))[:, None]
        grammars = [None if s.sampling.greedy else s.grammar for s in seqs]  # greedy rows: see choose_tokens
        masks = self._masker.submit(fill_masks, grammars) if any(g is not None for g in grammars) else None
        try:
            logits = self.runner.forward(slice(0, len(seqs)), last, mask)
        except Exception as exc:
            log.exception("ONNX decode step failed")
            if masks is not None:
                concurrent.futures.wait([masks])  # the matchers are in use until it is done
            for seq in seqs:
                seq.fail(exc)
            self._retire_finished()
            return
        self.stats.record_step(len(seqs))
        for seq, token in zip(seqs, choose_tokens(logits, seqs, masks), strict=True):
            seq.cached += 1
            seq.accept(token)
        self._retire_finished()

    def _retire_finished(self) -> None:
        """Drop finished sequences, moving the last running rows into their places (rows stay contiguous), and the
        row being prefilled to just after them."""
        before = len(self.running)
        i = 0
        while i < len(self.running):
            if not self.running[i].finished:
                i += 1
                continue
            last = self.running.pop()
            if i < len(self.running):
                self.pool.move(len(self.running), i, last.cached)
                self.running[i] = last
        if self.prefilling is not None and len(self.running) < before:
            self.pool.move(before, len(self.running), self.prefilling.cached)

    def _update_stats(self) -> None:
        """Recount from the scheduler's state (a finishing sequence calls this before its last chunk goes out)."""
        self.stats.running = sum(1 for s in self.running if not s.finished) + (self.prefilling is not None)
        self.stats.waiting = len(self.waiting) + len(self._inbox)

    def _pending(self) -> list[OnnxSequence]:
        return [*self.waiting, *self.running, *([self.prefilling] if self.prefilling else [])]

    def _fail_all(self, exc: BaseException) -> None:
        for seq in self._pending():
            seq.fail(exc)

    def _abort_all(self) -> None:
        with self._cond:
            self._stopping = True
            pending = [*self._inbox, *self._pending()]
            self._inbox.clear()
        for seq in pending:
            seq.finish("abort")
        self.waiting.clear()
        self.running.clear()
        self.prefilling = None
        self.pool.release()
        self._update_stats()
        self._masker.shutdown(wait=False)
