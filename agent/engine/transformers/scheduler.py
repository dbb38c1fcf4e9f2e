"""Continuous batching for the transformers engine, on one worker thread.

Vocabulary (as in TGI/vLLM): a *sequence* is one request being generated; *prefill* runs a sequence's prompt
through the model once, filling its KV cache; *decode* produces one more token for every running sequence in a
single forward pass.

Each loop iteration:
 1. drops aborted sequences (an `abort()` or a client that went away) from the batch and the waiting queue;
 2. admits waiting sequences up to `max_batch_size`, prefills them together (left-padded) and merges their cache
    into the running batch (`BatchState.merge`), so a new request starts at once instead of waiting for
    unrelated long requests to finish;
 3. runs ONE decode step for all running sequences, samples, streams the text deltas, and drops the finished rows.

Vision models (Qwen3-VL): images are encoded during their sequence's prefill; the M-RoPE offsets after the images
(`rope_delta`) are kept per row and decode steps pass explicit [4, B, 1] position ids, so vision and text requests
share decode steps exactly like text models. Every sequence keeps its own positions, so padding never changes
what a sequence computes (greedy output batched == alone, up to float rounding).

The async side (TransformersEngine) talks to this thread only through `submit`/`abort` (thread-safe) and the
per-sequence `Outbox` (the request's asyncio queue and its loop): the chunks of one step are handed to each event
loop with ONE `loop.call_soon_threadsafe`, so 32 streams cost one wake-up of the loop per step, not 32.
Errors inside a step fail the affected sequences with `EngineFailure`; the thread keeps serving the others.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import torch

from agent.engine.errors import EngineFailure
from agent.engine.scheduler_thread import SchedulerThread
from agent.engine.structured.grammar import apply_masks
from agent.engine.transformers.batch import BatchState, check_mergeable, mrope_positions, text_positions
from agent.engine.transformers.loading import LoadedModel
from agent.engine.transformers.sampling import sample_tokens
from agent.engine.transformers.sequence import Item, Outbox, TransformersSequence, send_all
from agent.engine.types import EngineStats

log = logging.getLogger(__name__)

# Prefill at most this many padded prompt tokens in one forward pass (more wait for the next iteration), so a
# burst of long prompts does not stall running sequences for long.
MAX_PREFILL_TOKENS = 8192
RECENT_BATCH_SIZES = 1024


class TransformersScheduler(SchedulerThread):
    """Owns the model while running: every forward pass happens on its thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str,
        max_batch_size: int,
        stats: EngineStats,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self._loaded = loaded
        self._device = torch.device(device)
        self._max_batch = max_batch_size
        self.stats = stats
        self.on_step = on_step
        self.recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=RECENT_BATCH_SIZES)
        self._waiting: collections.deque[TransformersSequence] = collections.deque()
        self._aborted: set[str] = set()
        self._live: set[str] = set()  # ids submitted and not yet finished (abort ignores any other id)
        self._admitted: list[TransformersSequence] = []  # being prefilled (neither waiting nor running)
        self._running: list[TransformersSequence] = []
        self._batch: BatchState | None = None
        super().__init__("transformers-engine")

    # --- called from the event loop ------------------------------------------------------------------------
    def submit(self, seq: TransformersSequence) -> None:
        with self._cond:
            if self._stopping:
                raise EngineFailure("engine is shutting down")
            self._waiting.append(seq)
            self._live.add(seq.request_id)
            self.stats.waiting = len(self._waiting)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._live:  # a finished (or reused) id must not abort a later request
                self._aborted.add(request_id)
                self._cond.notify()

    # --- the worker thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread
        # Denormal floats as zero: on a loaded machine fp32 SmolLM2 once ran ~10x slower after requests joined a
        # running batch (121 s instead of 5-24 s); not reproduced on a quiet one (5.3 s either way). Cheap insurance.
        torch.set_flush_denormal(True)
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._iteration()
                except Exception as exc:  # a bug outside a forward pass: fail what is running, keep serving
                    pending = self._running + [s for s in self._admitted if s not in self._running]
                    self._running, self._batch = [], None
                    self._fail(pending, exc, "scheduling")
                    self.stats.running = 0
                self._admitted = []
        self._abort_all()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._stopping and not self._waiting and not self._running:
                self._cond.wait()
            return not self._stopping

    def _iteration(self) -> None:
        self._drop_aborted()
        self._admitted = admitted = self._admit()
        if admitted:
            self._prefill_and_merge(admitted)
        if self._running:
            self._decode_step()
        self.stats.running = len(self._running)

    def _admit(self) -> list[TransformersSequence]:
        with self._cond:
            room = self._max_batch - len(self._running)
            admitted: list[TransformersSequence] = []
            longest = 0
            while self._waiting and len(admitted) < room:
                longest = max(longest, self._waiting[0].prompt.length)
                if admitted and longest * (len(admitted) + 1) > MAX_PREFILL_TOKENS:
                    break
                admitted.append(self._waiting.popleft())
            self.stats.waiting = len(self._waiting)
            return admitted

    def _drop_aborted(self) -> None:
        with self._cond:
            if not self._aborted:
                return
            aborted, self._aborted = self._aborted, set()
            waiting = [s for s in self._waiting if s.request_id in aborted]
            self._waiting = collections.deque(s for s in self._waiting if s.request_id not in aborted)
            self.stats.waiting = len(self._waiting)
        self._retire(waiting)
        for seq in waiting:
            seq.emit(seq.chunk("", "abort"))
        gone = [s for s in self._running if s.request_id in aborted]
        if gone:
            self._keep([i for i, s in enumerate(self._running) if s.request_id not in aborted])
        self._retire(gone)
        for seq in gone:
            seq.emit(seq.chunk("", "abort"))

    def _keep(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        if not self._running:
            self._batch = None
        elif self._batch is not None:
            self._batch.select(rows)
        self.stats.running = len(self._running)

    def _retire(self, seqs: list[TransformersSequence]) -> None:
        with self._cond:
            self._live.difference_update(s.request_id for s in seqs)

    def _record(self, batch_size: int) -> None:
        self.stats.record_step(batch_size)
        self.recent_batch_sizes.append(batch_size)
        if self.on_step is not None:
            try:
                self.on_step(batch_size)
            except Exception:  # a metrics hook must never fail the requests in the batch
                log.exception("on_step hook failed")

    def _prefill_and_merge(self, seqs: list[TransformersSequence]) -> None:
        try:
            state, logits = self._prefill(seqs)
            check_mergeable(state.cache)
            apply_masks(logits, [s.grammar for s in seqs])  # structured-output rows only
            tokens = sample_tokens(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        except Exception as exc:
            self._fail(seqs, exc, "prefill")
            return
        self._record(len(seqs))
        state.last_tokens = tokens.to(self._device)
        live, sends = self._stream(seqs, tokens)
        if live:
            if len(live) < len(seqs):
                state.select(live)
            new = [seqs[i] for i in live]
            if self._batch is None:
                self._batch, self._running = state, new
            else:
                self._batch.merge(state)
                self._running += new
            self.stats.running = len(self._running)
        send_all(sends)

    def _decode_step(self) -> None:
        batch = self._batch
        if batch is None:  # nothing running: the loop only calls this with a batch
            return
        try:
            out = self._loaded.model(**batch.decode_inputs(self._loaded.uses_mrope), use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :].float().cpu()
            apply_masks(logits, [s.grammar for s in self._running])  # structured-output rows only
            tokens = sample_tokens(logits, [s.sampling for s in self._running], [s.generator for s in self._running])
        except Exception as exc:
            # The shared cache may be half-updated: fail every running sequence, keep serving new ones.
            self._fail(self._running, exc, "decode")
            self._running, self._batch = [], None
            return
        self._record(len(self._running))
        batch.advance(tokens.to(self._device))
        live, sends = self._stream(self._running, tokens)
        if len(live) < len(self._running):
            self._keep(live)
        send_all(sends)

    def _stream(
        self, seqs: list[TransformersSequence], tokens: torch.Tensor
    ) -> tuple[list[int], list[tuple[Outbox, Item]]]:
        """Hand each sequence its token; return the indices of those still running and the emissions to send.

        Emissions are sent by the caller after the batch is updated, so a client that sees its final chunk also
        sees `stats.running` without its request.
        """
        live: list[int] = []
        sends: list[tuple[Outbox, Item]] = []
        with self._loaded.tokenizer_lock:
            for i, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
                chunk = seq.accept(int(token), self._loaded.eos_token_ids)
                if chunk is not None:
                    sends.append((seq.outbox, chunk))
                if chunk is None or not chunk.finished:
                    live.append(i)
        alive = set(live)
        self._retire([s for i, s in enumerate(seqs) if i not in alive])
        return live, sends

    def _prefill(self, seqs: list[TransformersSequence]) -> tuple[BatchState, torch.Tensor]:
        """One forward pass over the left-padded prompts; returns their cache and last-position logits."""
        length = max(s.prompt.length for s in seqs)
        pad = self._loaded.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, length - seq.prompt.length :] = torch.tensor(seq.prompt.input_ids)
            mask[row, length - seq.prompt.length :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        pos = text_positions(mask)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        delta = torch.zeros(len(seqs), dtype=torch.long, device=self._device)
        if self._loaded.uses_mrope:
            delta = self._vision_kwargs(seqs, kwargs, length)
        out = self._loaded.model(**kwargs, use_cache=True, logits_to_keep=1)
        state = BatchState(
            cache=out.past_key_values,
            attention_mask=mask,
            next_pos=mask.sum(dim=1),
            rope_delta=delta,
            last_tokens=ids[:, -1],
        )
        return state, out.logits[:, -1, :].float().cpu()

    def _vision_kwargs(self, seqs: list[TransformersSequence], kwargs: dict[str, Any], length: int) -> torch.Tensor:
        """Add images and M-RoPE position ids to a prefill's kwargs; return each row's rope delta."""
        ids, mask, pos = kwargs["input_ids"], kwargs["attention_mask"], kwargs["position_ids"]
        with_images = [s for s in seqs if s.prompt.pixel_values is not None]
        if not with_images:
            kwargs["position_ids"] = mrope_positions(pos, torch.zeros(len(seqs), dtype=torch.long, device=ids.device))
            return torch.zeros(len(seqs), dtype=torch.long, device=ids.device)
        types = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            if seq.prompt.mm_token_type_ids is not None:
                types[row, length - seq.prompt.length :] = torch.tensor(seq.prompt.mm_token_type_ids)
        model = self._loaded.model
        pixel_values = torch.cat([s.prompt.pixel_values for s in with_images]).to(self._device, model.dtype)
        grid = torch.cat([s.prompt.image_grid_thw for s in with_images]).to(self._device)
        vision_pos, delta = model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask
        )
        kwargs.update(
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=types,
            position_ids=torch.cat([pos.unsqueeze(0), vision_pos.to(pos.dtype)], dim=0),
        )
        return delta.view(-1).to(torch.long)

    def _fail(self, seqs: list[TransformersSequence], exc: Exception, stage: str) -> None:
        ids = [s.request_id for s in seqs]
        log.error("transformers engine: %s failed for requests %s", stage, ids, exc_info=exc)
        self._retire(seqs)
        for seq in seqs:
            seq.emit(EngineFailure(f"engine failure during {stage} ({type(exc).__name__}); request {seq.request_id}"))

    def _abort_all(self) -> None:
        with self._cond:
            pending = list(self._waiting) + self._running
            self._waiting.clear()
            self._live.clear()
        for seq in pending:
            seq.emit(seq.chunk("", "abort"))
        self._running, self._batch = [], None
        self.stats.running = self.stats.waiting = 0
