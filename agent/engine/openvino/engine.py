"""OpenVINO GenAI engine (LOADING_STRATEGY=openvino): text models and Qwen3-VL on CPU, continuously batched.

`start()` exports `spec.folder` to OpenVINO IR once (agent.engine.openvino.build: optimum-intel in its own pinned
venv, int4 / int8 / fp32 weights from QUANTIZATION_TYPE) and loads it into openvino_genai's
ContinuousBatchingPipeline (paged attention, prefix caching, split-fuse prefill), driven by one scheduler thread
(agent.engine.openvino.scheduler). Text prompts are rendered by the shared `render_prompt` and tokenized with the
folder's Hugging Face tokenizer, so the pipeline sees the same tokens as every other engine; vision prompts go in as
rendered text plus images, through the pipeline's own image preprocessing, given the same pixel budget
(IMAGE_MIN_PIXELS / IMAGE_MAX_PIXELS) as the transformers engine. Text streams through the shared incremental
detokenizer. Why the export runs in its own venv: docs/openvino.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import DType
from agent.engine.cpu import usable_cores
from agent.engine.detokenize import IncrementalDetokenizer
from agent.engine.errors import (
    InvalidRequestError,
    ModelLoadError,
    UnsupportedInputError,
)
from agent.engine.images import check_aspect_ratio
from agent.engine.openvino.build import ensure_openvino_model, export_options, model_kind, read_config
from agent.engine.openvino.scheduler import OvScheduler, OvSequence
from agent.engine.openvino.structured import OvGrammars
from agent.engine.prompt import render_prompt
from agent.engine.request_stream import ChunkChannel, ScheduledEngine, check_sampling, room_after
from agent.engine.spec import EngineSpec
from agent.engine.structured.grammar import GrammarLimits
from agent.engine.types import EngineInfo, EngineStats, GenerationChunk, GenerationRequest

log = logging.getLogger(__name__)

# The exported image processor's settings: the pipeline reads its pixel budget there; its patch and merge sizes give
# the pixels per LLM token (Qwen2/3-VL: one token per (16 * 2)^2 px).
_PREPROCESSOR = "preprocessor_config.json"


@dataclass
class _Loaded:
    """Everything `start()` loads; None before start and after shutdown."""

    tokenizer: Any  # the model folder's Hugging Face tokenizer: chat template, encoding, decoding
    model_path: Path  # the cached export
    view: Path | None  # the folder the pipeline loads for vision models (links + our pixel budget)
    context_length: int
    eos_ids: frozenset[int]
    vision: bool
    image_factor: int  # pixels per side of one LLM image token (vision models)
    scheduler: OvScheduler
    grammars: OvGrammars  # structured output: checked and compiled here, enforced by the pipeline


class OpenVinoEngine(ScheduledEngine):
    """Engine on an optimum-intel export, served by OpenVINO GenAI's ContinuousBatchingPipeline on CPU."""

    label = "OpenVINO"

    def __init__(self, spec: EngineSpec, *, threads: int | None = None) -> None:
        self.spec = spec
        self.stats = EngineStats()
        self.threads = threads or usable_cores()
        self._loaded: _Loaded | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loaded is not None:
            return
        if self.spec.device != "cpu":
            raise ModelLoadError(
                f"DEVICE={self.spec.device}: LOADING_STRATEGY=openvino runs on CPU here (OpenVINO has no CUDA "
                "plugin); use LOADING_STRATEGY=vllm on NVIDIA GPUs"
            )
        started = time.monotonic()
        self._loaded = await asyncio.to_thread(self._load)
        log.info("OpenVINO engine ready in %.1f s (%d threads)", time.monotonic() - started, self.threads)

    def _load(self) -> _Loaded:
        try:
            import openvino_genai as ov_genai
        except ImportError as exc:
            raise ModelLoadError(
                f"LOADING_STRATEGY=openvino needs openvino-genai ({exc}): pip install -r requirements.txt"
            ) from exc
        from transformers import AutoTokenizer

        config = read_config(self.spec.folder)
        kind = model_kind(config)
        options = export_options(self.spec.quantization, config)
        path = ensure_openvino_model(self.spec.folder, self.spec.cache_dir, options, kind=kind)
        vision = kind == "vision"
        view = _budget_view(path, self.spec.image_min_pixels, self.spec.image_max_pixels) if vision else None
        scheduler_config = ov_genai.SchedulerConfig()
        scheduler_config.max_num_seqs = self.spec.max_batch_size
        scheduler_config.cache_size = max(1, self.spec.openvino_kv_cache_mb >> 10)
        scheduler_config.enable_prefix_caching = True
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.spec.folder)
            properties = self._properties()
            # The vision encoder gets the same settings explicitly: the pipeline takes its properties as a separate
            # map (empty by default), and DTYPE and the thread settings must hold for it as for the LLM.
            pipeline = ov_genai.ContinuousBatchingPipeline(
                str(view or path), scheduler_config, "CPU", properties, vision_encoder_properties=properties
            )
        except Exception as exc:  # a corrupt export, an OpenVINO that cannot compile it
            raise ModelLoadError(f"could not load the OpenVINO model at {path}: {type(exc).__name__}: {exc}") from exc
        scheduler = OvScheduler(pipeline, stats=self.stats)
        scheduler.start()
        text = config.get("text_config") or config
        preprocessor = json.loads((path / _PREPROCESSOR).read_text()) if vision else {}
        eos_ids = _eos_ids(self.spec.folder, config, tokenizer)
        grammars = OvGrammars(
            tokenizer,
            vocab_size=int(text.get("vocab_size") or len(tokenizer)),  # the logits' width
            stop_token_ids=eos_ids,
            limits=GrammarLimits(self.spec.grammar_cache_size, self.spec.grammar_compile_timeout_s),
        )
        return _Loaded(
            tokenizer=tokenizer,
            model_path=path,
            view=view,
            context_length=int(text.get("max_position_embeddings") or 2048),
            eos_ids=eos_ids,
            vision=vision,
            image_factor=int(preprocessor.get("patch_size", 16)) * int(preprocessor.get("merge_size", 2)),
            scheduler=scheduler,
            grammars=grammars,
        )

    def _properties(self) -> dict[str, Any]:
        """CPU plugin properties. DTYPE=float32 pins f32 compute and an f32 KV cache (exact against transformers
        fp32, and the same on every CPU); auto leaves OpenVINO's defaults (bf16 where the CPU has it natively,
        u8 KV cache); bfloat16 asks for bf16. Thread pinning is off: OpenVINO pins its threads to cores by default,
        and on a CPU shared with other processes (the server's own event loop included) a pinned thread cannot
        leave a busy core, so every parallel op waits for it; unpinned, the 2B-shaped vision tower ran 14% faster
        at the median on a loaded 2-core EPYC, and without pinning's multi-second outliers (docs/openvino.md)."""
        props: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.threads, "ENABLE_CPU_PINNING": False}
        if self.spec.dtype is DType.float32:
            props.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
        elif self.spec.dtype is DType.bfloat16:
            props["INFERENCE_PRECISION_HINT"] = "bf16"
        return props

    def info(self) -> EngineInfo:
        loaded = self._loaded
        return EngineInfo(
            model_name=self.spec.name,
            engine="openvino",
            supports_images=bool(loaded and loaded.vision),
            context_length=loaded.context_length if loaded else 0,
            device="cpu",
            model_path=str(self.spec.folder),
            dtype="float32" if self.spec.dtype is DType.float32 else self.spec.dtype.value,
            quantization=self.spec.quantization.value,
        )

    @property
    def model_path(self) -> Path | None:
        """The cached OpenVINO export in use (None before start)."""
        return self._loaded.model_path if self._loaded else None

    # --- requests ------------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        loaded: _Loaded = self._running()
        seq, channel = self._sequence(loaded, request)
        constraint = request.sampling.constraint
        if constraint is not None:
            # Compiled (or refused with 400) here before the pipeline sees it (agent.engine.openvino.structured).
            seq.config.structured_output_config = await loaded.grammars.config(constraint)
            # The grammar's end admits every EOS id; once it is complete only those remain, so the answer ends
            # with `stop` (ignore_eos cannot outlast a completed grammar, as in the other engines).
            seq.config.stop_token_ids = set(loaded.eos_ids)
            seq.min_new_tokens = 0
        async with aclosing(self._submit(loaded, seq, channel)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _sequence(self, loaded: _Loaded, request: GenerationRequest) -> tuple[OvSequence, ChunkChannel]:
        import openvino as ov

        sampling = request.sampling
        images = request.images
        if images and not loaded.vision:
            raise UnsupportedInputError(f"{self.spec.name} is a text-only model (no vision): it cannot see images")
        check_sampling(sampling)
        prompt = render_prompt(loaded.tokenizer, request.messages, vision=loaded.vision, tools=request.tools)
        ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
        check_aspect_ratio(images)  # the same 400 as the transformers engine
        # Each image's single placeholder token becomes one token per image_factor^2 pixels of the resized image.
        image_tokens = [self._image_tokens(loaded, img.width, img.height) for img in images]
        prompt_tokens = len(ids) + sum(image_tokens) - len(image_tokens)
        max_new = min(sampling.max_new_tokens, room_after(prompt_tokens, loaded.context_length))
        channel = ChunkChannel()
        if loaded.vision:
            prompt_input: Any = prompt  # the pipeline expands each image's placeholder itself
            ov_images = [ov.Tensor(np.ascontiguousarray(np.asarray(img.convert("RGB"))[None])) for img in images]
        else:
            prompt_input = ov.Tensor(np.asarray([ids], dtype=np.int64))
            ov_images = []
        seq = OvSequence(
            request_id=request.request_id,
            prompt=prompt_input,
            images=ov_images,
            prompt_tokens=prompt_tokens,
            sampling=sampling,
            max_new_tokens=max_new,
            sink=channel.put,
            detokenizer=IncrementalDetokenizer(loaded.tokenizer, ids),
            eos_ids=loaded.eos_ids,
            config=_generation_config(sampling, max_new),
        )
        return seq, channel

    def _image_tokens(self, loaded: _Loaded, width: int, height: int) -> int:
        """LLM tokens for one image after the processor's resize into the pixel budget (Qwen2/3-VL smart resize)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = loaded.image_factor
        try:
            h, w = smart_resize(
                height,
                width,
                factor=factor,
                min_pixels=self.spec.image_min_pixels,
                max_pixels=self.spec.image_max_pixels,
            )
        except ValueError as exc:  # e.g. an aspect ratio over 200
            raise InvalidRequestError(f"image: {width}x{height} cannot be used ({exc})") from None
        return (h // factor) * (w // factor)


def _generation_config(sampling: Any, max_new_tokens: int) -> Any:
    """Sampling settings -> a GenerationConfig. The pipeline never stops a request itself (ignore_eos): EOS, stop
    strings and length are decided by OvSequence.accept, the same way as in the other engines."""
    import openvino_genai as ov_genai

    config = ov_genai.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.ignore_eos = True
    config.apply_chat_template = False  # prompts are rendered by render_prompt
    if sampling.greedy:
        config.do_sample = False
    else:
        config.do_sample = True
        config.temperature = float(sampling.temperature)
        config.top_p = float(sampling.top_p)
        config.top_k = 0  # no top-k cut (the pipeline's default is "all" too; 0 disables it explicitly)
        config.rng_seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
    return config


def _budget_view(path: Path, min_pixels: int, max_pixels: int) -> Path:
    """A folder of links to the cached export whose preprocessor_config.json carries this pixel budget, so the
    pipeline resizes images as the transformers engine does; the export itself stays budget-free. Made once per
    export and budget (atomically, beside the export) and shared by every engine that asks for the same."""
    view = path.parent / "views" / f"{path.name}-px{min_pixels}-{max_pixels}"
    if (view / _PREPROCESSOR).is_file() and all((view / p.name).exists() for p in path.iterdir()):
        return view
    view.parent.mkdir(parents=True, exist_ok=True)
    tmp = view.with_name(f"{view.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(view, ignore_errors=True)  # stale: its export was rebuilt or removed
    tmp.mkdir()
    for item in path.iterdir():
        if item.name != _PREPROCESSOR:
            (tmp / item.name).symlink_to(item)
    config = json.loads((path / _PREPROCESSOR).read_text())
    config.update(min_pixels=int(min_pixels), max_pixels=int(max_pixels))
    if isinstance(config.get("size"), dict):
        config["size"] = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    (tmp / _PREPROCESSOR).write_text(json.dumps(config, indent=2))
    try:
        tmp.rename(view)
    except OSError:  # another engine made the same view first
        shutil.rmtree(tmp, ignore_errors=True)
    return view


def _eos_ids(folder: Path, config: dict, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json (and its text_config) and the tokenizer."""
    ids: set[int] = set()
    sources: list[Any] = [config, config.get("text_config") or {}]
    generation = folder / "generation_config.json"
    if generation.is_file():
        sources.append(json.loads(generation.read_text()))
    values = [s.get("eos_token_id") for s in sources] + [tokenizer.eos_token_id]
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return frozenset(ids)
