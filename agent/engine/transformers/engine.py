"""The transformers engine: a Hugging Face model served with our own continuous-batching scheduler.

`TransformersEngine` is the async face (the `Engine` interface); the model lives on one worker thread
(`agent.engine.transformers.scheduler.TransformersScheduler`) that batches every concurrent request into shared
forward passes. Loading rules (dtype, quantization, attention, vision processor) are in
`agent.engine.transformers.loading`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch

from agent.engine.base import Engine
from agent.engine.cpu import usable_cores
from agent.engine.detokenize import IncrementalDetokenizer, StopMatcher
from agent.engine.errors import (
    EngineFailure,
    InvalidRequestError,
    ModelLoadError,
    NotReadyError,
    UnsupportedInputError,
)
from agent.engine.images import check_aspect_ratio
from agent.engine.prompt import render_prompt
from agent.engine.spec import EngineSpec
from agent.engine.structured.grammar import GrammarCache, GrammarLimits, LazyGrammarCache
from agent.engine.transformers.loading import LoadedModel, load_model
from agent.engine.transformers.scheduler import TransformersScheduler
from agent.engine.transformers.sequence import Outbox, PreparedPrompt, TransformersSequence
from agent.engine.types import (
    EngineInfo,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    Message,
    SamplingParams,
)

log = logging.getLogger(__name__)

VISION_EXAMPLE = "Qwen/Qwen3-VL-8B-Instruct"


class TransformersEngine(Engine):
    """Serves one Hugging Face checkpoint (text or Qwen3-VL) with continuous batching on CPU or CUDA."""

    def __init__(self, spec: EngineSpec, *, on_step: Callable[[int], None] | None = None) -> None:
        self.spec = spec
        self.stats = EngineStats()
        self._on_step = on_step
        self._loaded: LoadedModel | None = None
        self._scheduler: TransformersScheduler | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model off the event loop, start the worker thread, and warm up with one short generation."""
        started = time.monotonic()
        if self.spec.device == "cpu":
            torch.set_num_threads(usable_cores())
            # Also here (the worker thread sets it too): threads created later, e.g. the intra-op pool, inherit the
            # floating-point environment of their creator. See the scheduler's worker for the measured slowdown.
            torch.set_flush_denormal(True)
        self._loaded = await asyncio.to_thread(load_model, self.spec)
        self._grammars = LazyGrammarCache(
            self._loaded.tokenizer,
            vocab_size=int(self._loaded.model.get_output_embeddings().weight.shape[0]),  # the logits' width
            stop_token_ids=self._loaded.eos_token_ids,
            limits=GrammarLimits(self.spec.grammar_cache_size, self.spec.grammar_compile_timeout_s),
        )
        self._scheduler = TransformersScheduler(
            self._loaded,
            device=self.spec.device,
            max_batch_size=self.spec.max_batch_size,
            stats=self.stats,
            on_step=self._on_step,
        )
        self._scheduler.start()
        # bf16 on CPU is very slow on its first calls: pay that before the first user does.
        warmup = GenerationRequest(
            messages=(Message.text("user", "Hello"),),
            sampling=SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True),
        )
        try:
            await self.complete(warmup)
        except EngineFailure as exc:  # loads but cannot generate here: a load error, not a 500 per request
            await self.shutdown()
            raise ModelLoadError(f"{self.spec.name}: warm-up generation failed ({exc.message})") from exc
        log.info("transformers engine ready: %s in %.1f s", self.spec.name, time.monotonic() - started)

    async def shutdown(self) -> None:
        """Abort everything, stop the worker thread and free the model."""
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)
            self._scheduler = None
        if self._grammars is not None:
            self._grammars.close()
            self._grammars = None
        self._loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    async def health(self) -> bool:
        return self._scheduler is not None and self._scheduler.alive

    def info(self) -> EngineInfo:
        loaded = self._require_loaded()
        return EngineInfo(
            model_name=self.spec.name,
            engine="transformers",
            supports_images=loaded.is_vision,
            context_length=loaded.context_length,
            device=self.spec.device,
            model_path=str(self.spec.folder),
            dtype=str(loaded.dtype).removeprefix("torch."),
            quantization=str(self.spec.quantization),
        )

    def grammar_cache(self) -> GrammarCache:
        """The structured-output grammars compiled for this model (built on first use: blocking)."""
        if self._grammars is None:
            raise NotReadyError("model not loaded", retry_after=5)
        return self._grammars.cache()

    @property
    def recent_batch_sizes(self) -> list[int]:
        """Sequences per forward pass over the most recent steps (for a batch-size histogram)."""
        return list(self._scheduler.recent_batch_sizes) if self._scheduler else []

    # --- prompts -------------------------------------------------------------------------------------------
    def prompt_for(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] = ()) -> str:
        """The exact prompt string the model sees for `messages` (the shared `render_prompt`)."""
        loaded = self._require_loaded()
        return render_prompt(loaded.processor or loaded.tokenizer, messages, vision=loaded.is_vision, tools=tools)

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        """Tokenize (and, for vision models, process images of) a request. Blocking: CPU work."""
        loaded = self._require_loaded()
        if request.images and not loaded.is_vision:
            raise UnsupportedInputError(
                f"{self.spec.name} is text-only; load a vision-language model such as {VISION_EXAMPLE} "
                "(POST /load_model) to send images"
            )
        prompt = self.prompt_for(request.messages, request.tools)
        if loaded.processor is None:
            with loaded.tokenizer_lock:
                ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            return PreparedPrompt(input_ids=list(ids))
        images = request.images or None
        check_aspect_ratio(request.images)  # before the processor, whose ValueError would be a 500
        with loaded.tokenizer_lock:
            out = loaded.processor(text=[prompt], images=images, return_tensors="pt")
        types = out.get("mm_token_type_ids")
        return PreparedPrompt(
            input_ids=out["input_ids"][0].tolist(),
            pixel_values=out.get("pixel_values") if images else None,
            image_grid_thw=out.get("image_grid_thw") if images else None,
            mm_token_type_ids=types[0].tolist() if types is not None else None,
        )

    def count_image_tokens(self, request: GenerationRequest) -> int:
        """How many image placeholder tokens the request's prompt carries (0 for text-only models)."""
        loaded = self._require_loaded()
        image_token = getattr(loaded.model.config, "image_token_id", None)
        if image_token is None:
            return 0
        return sum(1 for t in self.prepare(request).input_ids if t == image_token)

    # --- generation ----------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one request's chunks; closing the iterator early aborts it."""
        scheduler, loaded = self._scheduler, self._loaded
        if scheduler is None or loaded is None or not scheduler.alive:
            raise NotReadyError("model not loaded", retry_after=5)
        prompt = await asyncio.to_thread(self.prepare, request)
        grammar = await self._grammars.state(request.sampling.constraint) if self._grammars else None
        room = loaded.context_length - prompt.length
        if room <= 0:
            raise InvalidRequestError(
                f"prompt is {prompt.length} tokens; {self.spec.name}'s context is {loaded.context_length} tokens"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        seq = TransformersSequence(
            request_id=request.request_id,
            prompt=prompt,
            sampling=request.sampling,
            max_new_tokens=max(1, min(request.sampling.max_new_tokens, room)),
            outbox=Outbox(loop, queue),
            detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt.input_ids),
            stop=StopMatcher(request.sampling.stop),
            grammar=grammar,
        )
        scheduler.submit(seq)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer went away (or was cancelled): free the batch slot
                scheduler.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a running or waiting request; its stream ends with finish_reason "abort"."""
        if self._scheduler is not None:
            self._scheduler.abort(request_id)

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise NotReadyError("model not loaded", retry_after=5)
        return self._loaded


__all__ = ["TransformersEngine"]
