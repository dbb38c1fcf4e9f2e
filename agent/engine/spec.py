"""EngineSpec: everything an engine needs to load one model, resolved from Settings by the model loader."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from agent.config import Attention, DType, Quantization


@dataclass(frozen=True)
class EngineSpec:
    folder: Path  # local Hugging Face folder (see agent.engine.checkpoints)
    name: str  # served model name
    device: str = "cpu"  # "cpu" | "cuda" (resolved, never "auto")
    dtype: DType = DType.auto
    quantization: Quantization = Quantization.none
    attention: Attention = Attention.sdpa
    max_batch_size: int = 32
    image_min_pixels: int = 64 * 64
    image_max_pixels: int = 1024 * 1024
    vllm_enforce_eager: bool = True
    vllm_max_model_len: int = 4096
    onnx_kv_cache_mb: int = 2048
    onnx_prefix_cache_mb: int = 256
    grammar_cache_size: int = 64  # compiled structured-output grammars kept (agent.engine.structured.grammar)
    grammar_compile_timeout_s: float = 10.0  # a schema compiling longer is refused with 400
    openvino_kv_cache_mb: int = 2048
    cache_dir: Path = Path.home() / ".cache" / "newbie-app"

    def with_(self, **changes: object) -> EngineSpec:
        return replace(self, **changes)
