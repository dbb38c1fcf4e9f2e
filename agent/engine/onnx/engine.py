"""ONNX Runtime GenAI engine (LOADING_STRATEGY=onnx): int4, int8 or fp32 text models on CPU.

`start()` builds the ONNX model from `spec.folder` once into `spec.cache_dir / "onnx"` with onnxruntime-genai's model
builder (agent.engine.onnx.build), loads the built decoder into onnxruntime with one intra-op thread per usable core,
and starts the continuous-batching scheduler (agent.engine.onnx.scheduler: why it runs the decoder itself rather
than through onnxruntime-genai's generator is explained there and in docs/onnx.md).
Prompts are built by the shared `render_prompt` and tokenized with the model folder's Hugging Face tokenizer (the
same tokens as every other engine); text streams through the shared incremental detokenizer.
Vision models are refused with ModelLoadError (the builder exports only a VL model's text decoder).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.engine.cpu import usable_cores
from agent.engine.detokenize import IncrementalDetokenizer
from agent.engine.errors import ModelLoadError, NotReadyError, UnsupportedInputError
from agent.engine.onnx.build import OnnxBuildOptions, ensure_onnx_model, precision_for
from agent.engine.onnx.kv import KvPool, KvShape, PrefixCache
from agent.engine.onnx.runner import DecoderRunner
from agent.engine.onnx.scheduler import OnnxScheduler, OnnxSequence, SchedulerLimits
from agent.engine.prompt import render_prompt
from agent.engine.request_stream import ChunkChannel, ScheduledEngine, check_sampling, room_after
from agent.engine.spec import EngineSpec
from agent.engine.structured.grammar import GrammarCache, GrammarLimits, LazyGrammarCache
from agent.engine.types import EngineInfo, EngineStats, GenerationChunk, GenerationRequest

log = logging.getLogger(__name__)

# MatMulNBits compute: None keeps the builder's default, which in onnxruntime-genai 0.18 is already 4 (int8 compute,
# AVX-512 VNNI) on CPU; 1 (fp32 compute) measured slower here. See docs/onnx.md.
DEFAULT_ACCURACY_LEVEL: int | None = None


@dataclass
class _OnnxModel:
    """Everything `start()` loads; None before start and after shutdown."""

    tokenizer: Any  # the model folder's Hugging Face tokenizer: chat template, encoding, decoding
    onnx_path: Path
    context_length: int
    eos_ids: frozenset[int]
    scheduler: OnnxScheduler
    grammars: LazyGrammarCache


class OnnxEngine(ScheduledEngine):
    """Engine on a model built by onnxruntime-genai: continuous batching and a prefix cache over onnxruntime."""

    label = "ONNX"

    def __init__(
        self,
        spec: EngineSpec,
        *,
        accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
        threads: int | None = None,
        prefill_tokens: int = 512,
    ) -> None:
        self.spec = spec
        self.stats = EngineStats()
        self.threads = threads or usable_cores()
        self._accuracy_level = accuracy_level
        self._prefill_tokens = prefill_tokens
        self._loaded: _OnnxModel | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loaded is not None:
            return
        if self.spec.device != "cpu":
            raise ModelLoadError(
                f"DEVICE={self.spec.device}: LOADING_STRATEGY=onnx runs on CPU here "
                "(onnxruntime-genai's CUDA build is not installed); use LOADING_STRATEGY=vllm on GPUs"
            )
        options = OnnxBuildOptions(precision_for(self.spec.quantization), self._accuracy_level)
        started = time.monotonic()
        self._loaded = await asyncio.to_thread(self._load, options)
        log.info("ONNX engine ready in %.1f s (%s, %d threads)", time.monotonic() - started, options.tag, self.threads)

    def _load(self, options: OnnxBuildOptions) -> _OnnxModel:
        from transformers import AutoTokenizer

        path = ensure_onnx_model(self.spec.folder, self.spec.cache_dir, options)
        genai = json.loads((path / "genai_config.json").read_text())["model"]
        decoder = genai["decoder"]
        shape = KvShape(decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"])
        context_length = int(genai["context_length"])
        pool = KvPool(shape, context_length)
        try:
            runner = DecoderRunner(path / decoder["filename"], self.threads, pool)
            tokenizer = AutoTokenizer.from_pretrained(self.spec.folder)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"could not load the ONNX model at {path}: {exc}") from exc
        _warm_up(runner)
        limits = SchedulerLimits(
            max_batch_size=self.spec.max_batch_size,
            kv_budget_bytes=self.spec.onnx_kv_cache_mb << 20,
            prefill_tokens=self._prefill_tokens,
        )
        prefixes = PrefixCache(shape.bytes_per_token, self.spec.onnx_prefix_cache_mb << 20)
        scheduler = OnnxScheduler(runner, prefixes, limits=limits, stats=self.stats)
        scheduler.start()
        eos = genai["eos_token_id"]
        eos_ids = frozenset(int(t) for t in (eos if isinstance(eos, list) else [eos]))
        grammars = LazyGrammarCache(
            tokenizer,
            vocab_size=int(genai["vocab_size"]),  # the logits' width
            stop_token_ids=eos_ids,
            limits=GrammarLimits(self.spec.grammar_cache_size, self.spec.grammar_compile_timeout_s),
        )
        return _OnnxModel(
            tokenizer=tokenizer,
            onnx_path=path,
            context_length=context_length,
            eos_ids=eos_ids,
            scheduler=scheduler,
            grammars=grammars,
        )

    def info(self) -> EngineInfo:
        loaded = self._loaded
        precision = {"int4": "int4", "int8": "int8"}.get(self.spec.quantization.value, "float32")
        return EngineInfo(
            model_name=self.spec.name,
            engine="onnx",
            supports_images=False,
            context_length=loaded.context_length if loaded else 0,
            device="cpu",
            model_path=str(self.spec.folder),
            dtype=precision,
            quantization=self.spec.quantization.value,
        )

    def grammar_cache(self) -> GrammarCache:
        """The structured-output grammars compiled for this model (built on first use: blocking)."""
        if self._loaded is None:
            raise NotReadyError("the ONNX engine is not started", retry_after=5)
        return self._loaded.grammars.cache()

    @property
    def onnx_path(self) -> Path | None:
        """The cached ONNX model folder in use (None before start)."""
        return self._loaded.onnx_path if self._loaded else None

    # --- requests ------------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        loaded: _OnnxModel = self._running()
        seq, channel = self._sequence(loaded, request)
        seq.grammar = await loaded.grammars.state(request.sampling.constraint)
        if seq.grammar is not None:
            seq.min_new_tokens = 0  # a completed grammar ends the answer (see Sequence)
        async with aclosing(self._submit(loaded, seq, channel)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _sequence(self, loaded: _OnnxModel, request: GenerationRequest) -> tuple[OnnxSequence, ChunkChannel]:
        sampling = request.sampling
        if request.images:
            raise UnsupportedInputError(f"{self.spec.name} is a text-only model (no vision): it cannot see images")
        check_sampling(sampling)
        prompt = render_prompt(loaded.tokenizer, request.messages, vision=False, tools=request.tools)
        prompt_ids = np.asarray(loaded.tokenizer.encode(prompt, add_special_tokens=False), dtype=np.int64)
        room = room_after(len(prompt_ids), loaded.context_length)
        channel = ChunkChannel()
        seq = OnnxSequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            max_new_tokens=min(sampling.max_new_tokens, room),
            sink=channel.put,
            detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt_ids.tolist()),
            eos_ids=loaded.eos_ids,
            rng=np.random.default_rng(sampling.seed),
        )
        return seq, channel


def _warm_up(runner: DecoderRunner) -> None:
    """One tiny forward pass so the first user request does not pay for onnxruntime's lazy initialisation."""
    runner.pool.ensure(1, 8, keep=(0, 0))
    runner.forward(slice(0, 1), np.asarray([[1, 2, 3]]), np.ones((1, 3), dtype=np.int64))
    runner.pool.release()
