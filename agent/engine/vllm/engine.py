"""The vLLM engine: one `AsyncLLM` (vLLM's v1 engine) behind our `Engine` interface.

vLLM does the batching (continuous batching, paged KV cache) in its own EngineCore process; this module only maps
our spec, prompts and sampling onto vLLM's and its outputs back onto `GenerationChunk`s.

Mapping (impossible combinations raise ModelLoadError at `start()`, naming the env var and the alternative):
- QUANTIZATION_TYPE: none -> no quantization; awq/gptq -> passed through (vLLM checks the checkpoint);
  int4 -> vLLM's on-load bitsandbytes 4-bit, CUDA only and only where the installed vLLM still ships it
  (vllm 0.32 does not); int8 -> never (vLLM quantizes on load to 4 bits only): use the transformers engine.
- ATTENTION_IMPL: sdpa/eager -> vLLM's default attention backend; flash_attention_2 -> FLASH_ATTN, CUDA only.
- DTYPE: auto -> bfloat16 on CPU (~1.7x faster than fp32 there), the checkpoint's dtype on CUDA.
- Vision models run on vLLM on CUDA only: vLLM's CPU build needs torchvision for them, which cannot be installed
  beside CPU torch here (use LOADING_STRATEGY=transformers).

Environment (read by vLLM itself, left to the user):
- VLLM_CPU_KVCACHE_SPACE (GiB): the KV cache on CPU. Unset, vLLM would reserve 90 % of the machine's RAM (and refuse
  to start when that much is not free), so this engine then sizes it to DEFAULT_CPU_KV_CACHE_GIB (2 GiB: ~90k tokens
  of SmolLM2-135M in bf16, enough for 32 sequences of ~2.8k tokens). Raise it for bigger models or batches.
- VLLM_CPU_OMP_THREADS_BIND: leave the default (binding every core was 3x slower on 2 cores).

Stats: `stats.running` counts requests in flight in this process. `stats.waiting` and the batch sizes come from
vLLM: a stat logger receives its scheduler and iteration stats after every engine step; the number of sequences that
got a token in that step is recorded as the step's batch size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.config import Attention, DType, Quantization
from agent.engine.base import Engine
from agent.engine.errors import (
    EngineFailure,
    InvalidRequestError,
    ModelLoadError,
    NotReadyError,
    OverloadedError,
    UnsupportedInputError,
)
from agent.engine.prompt import render_prompt
from agent.engine.spec import EngineSpec
from agent.engine.types import (
    EngineInfo,
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    OutputConstraint,
    SamplingParams,
)

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GIB = 2
# Images one prompt may carry (vLLM sizes its profiling run by it); history images count too.
MAX_IMAGES_PER_PROMPT = 8
_SHUTDOWN_TIMEOUT_S = 20.0
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


_VISION_ON_CPU = (
    "{name} is a vision model: vLLM on CPU needs torchvision for it, which cannot be installed beside CPU torch; "
    "use LOADING_STRATEGY=transformers (or vLLM on a CUDA machine)"
)


def _has_vision_tower(folder: Path) -> bool:
    """The checkpoint's config.json declares a vision tower (Qwen3-VL and other VLMs)."""
    try:
        return "vision_config" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False  # vLLM reports a missing/broken config better


def vllm_quantization_methods() -> list[str]:
    """The `quantization=` values the installed vLLM accepts."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    return list(QUANTIZATION_METHODS)


def quantization_arg(quantization: Quantization, device: str, methods: Sequence[str] | None = None) -> str | None:
    """QUANTIZATION_TYPE -> vLLM's `quantization` argument, or ModelLoadError when vLLM cannot do it here.

    `methods`: what the installed vLLM accepts (default: asked from vLLM, only when it matters).
    """
    if quantization is Quantization.none:
        return None
    if quantization in (Quantization.awq, Quantization.gptq):
        return quantization.value
    if device != "cuda":
        raise ModelLoadError(
            f"QUANTIZATION_TYPE={quantization.value}: vLLM on CPU cannot quantize on load; use QUANTIZATION_TYPE=none, "
            "or LOADING_STRATEGY=transformers for bitsandbytes int4"
        )
    if quantization is Quantization.int8:
        raise ModelLoadError(
            "QUANTIZATION_TYPE=int8: vLLM quantizes on load to 4 bits only; use LOADING_STRATEGY=transformers "
            "(bitsandbytes int8), QUANTIZATION_TYPE=int4, or an awq/gptq checkpoint"
        )
    if "bitsandbytes" not in (vllm_quantization_methods() if methods is None else methods):
        raise ModelLoadError(
            "QUANTIZATION_TYPE=int4: the installed vLLM has no on-load bitsandbytes quantization; use "
            "LOADING_STRATEGY=transformers (bitsandbytes int4), QUANTIZATION_TYPE=none, or an awq/gptq checkpoint"
        )
    return "bitsandbytes"


def attention_backend_arg(attention: Attention, device: str) -> str | None:
    """ATTENTION_IMPL -> vLLM's `attention_backend` (None: vLLM picks its default kernel for the device)."""
    if attention is not Attention.flash_attention_2:
        return None  # vLLM has no "eager"/"sdpa" switch: its own paged-attention kernel serves both
    if device != "cuda":
        raise ModelLoadError(
            "ATTENTION_IMPL=flash_attention_2 needs CUDA; on CPU use ATTENTION_IMPL=sdpa (vLLM's CPU attention)"
        )
    return "FLASH_ATTN"


def dtype_arg(dtype: DType, device: str) -> str:
    """DTYPE -> vLLM's `dtype` (auto is bfloat16 on CPU: vLLM's CPU kernels are fastest there)."""
    if dtype is DType.auto:
        return "bfloat16" if device == "cpu" else "auto"
    return dtype.value


def engine_kwargs(spec: EngineSpec, *, quantization_methods: Sequence[str] | None = None) -> dict[str, Any]:
    """The `AsyncEngineArgs` keyword arguments for a spec (raises ModelLoadError for impossible combinations)."""
    kwargs: dict[str, Any] = {
        "model": str(spec.folder),
        "served_model_name": spec.name,
        "dtype": dtype_arg(spec.dtype, spec.device),
        "quantization": quantization_arg(spec.quantization, spec.device, quantization_methods),
        "enforce_eager": spec.vllm_enforce_eager,
        "max_model_len": spec.vllm_max_model_len,
        "max_num_seqs": spec.max_batch_size,
        "disable_log_stats": True,  # our stat logger still gets the stats; this only mutes vLLM's periodic log
        "limit_mm_per_prompt": {"image": MAX_IMAGES_PER_PROMPT, "video": 0},
        # Structured output on xgrammar with compact JSON: the grammar the transformers and ONNX engines compile
        # (agent.engine.structured.grammar), so every engine accepts the same texts for the same schema.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        # Qwen-VL processors take the pixel budget as size={shortest_edge, longest_edge} in pixels.
        "mm_processor_kwargs": {
            "size": {"shortest_edge": spec.image_min_pixels, "longest_edge": spec.image_max_pixels}
        },
    }
    backend = attention_backend_arg(spec.attention, spec.device)
    if backend is not None:
        kwargs["attention_backend"] = backend
    if spec.device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_GIB * 1024**3
    return kwargs


def sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Our sampling parameters -> vLLM `SamplingParams` keyword arguments (streaming deltas)."""
    from vllm.sampling_params import RequestOutputKind

    kwargs = {
        "max_tokens": sampling.max_new_tokens,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "top_p": 1.0 if sampling.greedy else sampling.top_p,
        "seed": sampling.seed,
        "stop": list(sampling.stop) or None,
        # A completed grammar ends the answer, ignore_eos or not (as in our own engines' schedulers).
        "ignore_eos": sampling.ignore_eos and sampling.constraint is None,
        "output_kind": RequestOutputKind.DELTA,
    }
    if sampling.constraint is not None:
        kwargs["structured_outputs"] = structured_outputs(sampling.constraint)
    return kwargs


def structured_outputs(constraint: OutputConstraint) -> Any:
    """Our constraint -> vLLM's `StructuredOutputsParams` (compiled by vLLM's xgrammar backend, compact JSON: see
    `engine_kwargs`)."""
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=constraint.schema)


def finish_reason(reason: str | None) -> FinishReason | None:
    """vLLM's finish reason -> ours (anything unexpected, e.g. "error", is reported as "error")."""
    if reason is None:
        return None
    return _FINISH_REASONS.get(reason, "error")


def _step_recorder(stats: EngineStats) -> Any:
    """A vLLM per-engine stat-logger factory that copies scheduler stats into `stats` after every step."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepRecorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
            if scheduler_stats is not None:
                stats.waiting = scheduler_stats.num_waiting_reqs
            # Sequences that got a token this step (one each: no speculative decoding). The scheduler's running
            # count is taken after the step, so it misses the sequences that finished in it.
            if iteration_stats is not None and iteration_stats.num_generation_tokens:
                stats.record_step(iteration_stats.num_generation_tokens)

        def log_engine_initialized(self) -> None:
            pass

    return StepRecorder


class VllmEngine(Engine):
    """Serves one model with vLLM's AsyncLLM; see the module docstring for how settings map onto vLLM."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.stats = EngineStats()
        self._llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self._renderer: Any = None  # tokenizer or processor used to render chat prompts
        self._vision = False
        self._context_length = spec.vllm_max_model_len
        self._in_flight: set[str] = set()
        self._abort_asked: set[str] = set()

    async def start(self) -> None:
        """Build AsyncLLM (off the event loop: it loads the model, ~30 s eager on CPU) and warm it up."""
        if self._llm is not None:
            return
        kwargs = engine_kwargs(self.spec)
        # Checked before vLLM inspects the model: on CPU that inspection fails after ~30 s with a vague message.
        if self.spec.device != "cuda" and _has_vision_tower(self.spec.folder):
            raise ModelLoadError(_VISION_ON_CPU.format(name=self.spec.name))
        self._llm = await asyncio.to_thread(self._build, kwargs)
        try:
            self._renderer = await asyncio.to_thread(self._load_renderer)
            await self._warm_up()
        except BaseException:
            await self.shutdown()
            raise
        log.info("vLLM engine ready: %s (%s, %s)", self.spec.name, self.spec.device, kwargs["dtype"])

    def _build(self, kwargs: dict[str, Any]) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = {**kwargs, "structured_outputs_config": StructuredOutputsConfig(**kwargs["structured_outputs_config"])}
        try:
            vllm_config = AsyncEngineArgs(**kwargs).create_engine_config()
        except Exception as exc:  # unsupported architecture, bad config, quantization mismatch ...
            raise ModelLoadError(f"vLLM cannot load {self.spec.folder}: {exc}") from exc
        model_config = vllm_config.model_config
        self._vision = bool(model_config.is_multimodal_model)
        self._context_length = model_config.max_model_len
        if self._vision and self.spec.device != "cuda":
            raise ModelLoadError(_VISION_ON_CPU.format(name=self.spec.name))
        try:
            return AsyncLLM.from_vllm_config(
                vllm_config,
                stat_loggers=[_step_recorder(self.stats)],
                disable_log_stats=True,
            )
        except Exception as exc:  # OOM, EngineCore start failure ...
            raise ModelLoadError(f"vLLM failed to start {self.spec.name}: {type(exc).__name__}: {exc}") from exc

    def _load_renderer(self) -> Any:
        """The same tokenizer (processor for vision models) the transformers engine renders prompts with."""
        if self._vision:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(self.spec.folder)
            if getattr(processor, "chat_template", None):
                return processor
        return self._llm.get_tokenizer()

    async def _warm_up(self) -> None:
        """One token end to end, so `start()` returns only once the engine answers."""
        params = self._vllm_sampling(SamplingParams(max_new_tokens=1, temperature=0.0))
        async for _ in self._llm.generate({"prompt": "Hello"}, params, "warm-up"):
            pass

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_name=self.spec.name,
            engine="vllm",
            supports_images=self._vision,
            context_length=self._context_length,
            device=self.spec.device,
            model_path=str(self.spec.folder),
            dtype=dtype_arg(self.spec.dtype, self.spec.device),
            quantization=self.spec.quantization.value,
        )

    async def health(self) -> bool:
        if self._llm is None or self._llm.errored:
            return False
        try:
            await self._llm.check_health()
        except Exception:
            return False
        return True

    def _vllm_sampling(self, sampling: SamplingParams) -> Any:
        from vllm.sampling_params import SamplingParams as VllmSamplingParams

        return VllmSamplingParams(**sampling_kwargs(sampling))

    def _prompt(self, request: GenerationRequest) -> dict[str, Any]:
        images = request.images
        if images and not self._vision:
            raise UnsupportedInputError(f"{self.spec.name} is a text-only model (no vision): it cannot see images")
        text = render_prompt(self._renderer, request.messages, vision=self._vision, tools=request.tools)
        prompt: dict[str, Any] = {"prompt": text}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        return prompt

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        llm = self._llm  # shutdown() may clear self._llm while this stream runs
        if llm is None:
            raise NotReadyError("the vLLM engine is not started", retry_after=5)
        prompt = self._prompt(request)
        rid = request.request_id
        with _vllm_errors():
            params = self._vllm_sampling(request.sampling)
        # The chat template already wrote the special tokens (BOS etc.): don't let the tokenizer add them twice.
        stream = llm.generate(prompt, params, rid, tokenization_kwargs={"add_special_tokens": False})
        self._in_flight.add(rid)
        self.stats.running += 1
        prompt_tokens = completion_tokens = 0
        try:
            async for out in _translated(stream):
                if rid in self._abort_asked and not out.finished:
                    # abort() came before vLLM had registered the request (its abort was then a no-op): again.
                    self._abort_asked.discard(rid)
                    await llm.abort(rid)
                if out.prompt_token_ids:
                    prompt_tokens = len(out.prompt_token_ids)
                completion = out.outputs[0]
                completion_tokens += len(completion.token_ids)
                reason = finish_reason(completion.finish_reason) if out.finished else None
                if out.finished and reason is None:
                    reason = "abort"
                if completion.text or reason is not None:
                    yield GenerationChunk(rid, completion.text, prompt_tokens, completion_tokens, reason)
        finally:
            self.stats.running -= 1
            self._in_flight.discard(rid)
            self._abort_asked.discard(rid)
            if not self._in_flight:
                self.stats.waiting = 0  # vLLM reports waiting only per step: nothing in flight, nothing waits
            # Closing this generator early (client gone) closes vLLM's, which aborts the request there.
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and request_id in self._in_flight:
            self._abort_asked.add(request_id)
            await self._llm.abort(request_id)

    async def shutdown(self) -> None:
        """Abort what is in flight and stop vLLM's EngineCore process."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        if self._in_flight:
            with contextlib.suppress(Exception):
                await llm.abort(list(self._in_flight))
        # Stop the output handler first: otherwise it sees the EngineCore die and logs an EngineDeadError.
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        cores, workers = _engine_processes(llm)  # found now: once the EngineCore is gone, its worker is orphaned
        # Off the loop: it waits for the EngineCore to exit (~8 s on CPU). vLLM's default 5 s is shorter than its
        # worker's exit, and the EngineCore was then SIGKILLed.
        await asyncio.to_thread(llm.shutdown, _SHUTDOWN_TIMEOUT_S)
        await asyncio.to_thread(_reap, cores, workers)
        # AsyncLLM.__del__ shuts down again, at interpreter exit if something still holds it, where vLLM's module
        # globals are already gone (a spurious TypeError traceback): it is done, make that a no-op.
        llm.shutdown = lambda timeout=None: None
        log.info("vLLM engine stopped: %s", self.spec.name)


def _engine_processes(llm: Any) -> tuple[list[Any], list[Any]]:
    """vLLM's EngineCore processes (multiprocessing handles) and their children, the CPU workers (psutil)."""
    import psutil

    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    cores = list(getattr(getattr(resources, "engine_manager", None), "processes", None) or [])
    workers = []
    for core in cores:
        with contextlib.suppress(psutil.Error, ValueError):
            workers += psutil.Process(core.pid).children(recursive=True)
    return cores, workers


def _reap(cores: list[Any], workers: list[Any]) -> None:
    """After vLLM's shutdown: join the EngineCore processes (no zombie left) and wait for their workers, which can
    still be exiting when the EngineCore is gone (seen once under load); kill what outlives the timeout."""
    import psutil

    for core in cores:
        core.join(_SHUTDOWN_TIMEOUT_S)
    _, alive = psutil.wait_procs(workers, timeout=_SHUTDOWN_TIMEOUT_S)
    for worker in alive:
        log.warning("vLLM worker %d did not exit after shutdown: killing it", worker.pid)
        with contextlib.suppress(psutil.Error):
            worker.kill()
    multiprocessing.active_children()  # reap whatever else multiprocessing started


@contextlib.contextmanager
def _vllm_errors() -> Iterator[None]:
    """vLLM's exceptions -> our error table: bad request 400, queue full 429, engine failure 500."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMServerError

    try:
        yield
    except VLLMClientError as exc:  # validation: prompt longer than the context, bad sampling values ...
        raise InvalidRequestError(str(exc)) from exc
    except GracefulHTTPError as exc:
        raise OverloadedError(str(exc), retry_after=1) from exc
    except VLLMServerError as exc:  # EngineDeadError, EngineGenerateError: a crash, not the client's fault
        log.exception("vLLM failed")
        raise EngineFailure(f"vLLM failed: {type(exc).__name__}: {exc}") from exc


async def _translated(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    with _vllm_errors():
        async for item in stream:
            yield item
