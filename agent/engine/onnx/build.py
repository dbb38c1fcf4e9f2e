"""Build (once) and cache the ONNX Runtime GenAI model for a Hugging Face folder.

The model builder (`python -m onnxruntime_genai.models.builder`) runs as a subprocess so its ~2 GB peak memory is
returned to the OS as soon as it ends, and so a crash in it cannot take the server down. The output is written into a
temporary folder beside the cache entry and renamed into place, so a half-built model is never picked up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config import Quantization
from agent.engine.errors import ModelLoadError

log = logging.getLogger(__name__)

BUILDER_MODULE = "onnxruntime_genai.models.builder"
# Files whose change must invalidate a cached build.
_FINGERPRINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json")


# MatMulNBits block size per precision (measured on SmolLM2-135M, docs/onnx.md): int8 with blocks of 128 decodes a
# 32-row batch ~15 % faster and prefills ~15 % faster than blocks of 32 at the same perplexity (1.01x fp32); int4
# stays at the builder's 32, because int4 with blocks of 128 costs perplexity 1.66x fp32 (1.31x at 32).
BLOCK_SIZES = {"int8": 128}
# Bumped when what we do to the builder's output changes, so older cached builds are not reused.
RECIPE = 4


@dataclass(frozen=True)
class OnnxBuildOptions:
    """What the builder is asked for: precision ("int4" | "int8" | "fp32"), the MatMulNBits accuracy level
    (None: the builder's default, which in 0.18 is already 4 = int8 compute on CPU; 1 = fp32 compute) and block size
    (None: BLOCK_SIZES), and whether the LM head runs on the last prompt token only (agent.engine.onnx.last_token)."""

    precision: str = "int4"
    accuracy_level: int | None = None
    block_size: int | None = None
    last_token_logits: bool = True

    @property
    def quantized(self) -> bool:
        return self.precision in ("int4", "int8")

    @property
    def effective_block_size(self) -> int | None:
        return (self.block_size or BLOCK_SIZES.get(self.precision)) if self.quantized else None

    @property
    def tag(self) -> str:
        tag = self.precision
        if self.quantized and self.accuracy_level:
            tag += f"-acc{self.accuracy_level}"
        if self.effective_block_size:
            tag += f"-b{self.effective_block_size}"
        return tag + ("-last" if self.last_token_logits else "")

    def builder_args(self) -> list[str]:
        extra = []
        if self.quantized and self.accuracy_level:
            extra.append(f"accuracy_level={self.accuracy_level}")
        if self.effective_block_size:
            extra.append(f"block_size={self.effective_block_size}")
        if self.last_token_logits:
            extra.append("prune_lm_head=true")
        return ["-p", self.precision, "-e", "cpu"] + (["--extra_options", *extra] if extra else [])


_PRECISIONS = {Quantization.int4: "int4", Quantization.int8: "int8", Quantization.none: "fp32"}


def precision_for(quantization: Quantization) -> str:
    """QUANTIZATION_TYPE -> builder precision on CPU: int4 (default), int8, or fp32 (`none`).

    awq/gptq need checkpoints quantized that way, which this engine does not read."""
    try:
        return _PRECISIONS[quantization]
    except KeyError:
        raise ModelLoadError(
            f"QUANTIZATION_TYPE={quantization.value} is not available with LOADING_STRATEGY=onnx on CPU: "
            "use int4 (default), int8 or none (fp32)"
        ) from None


def _fingerprint(folder: Path) -> str:
    parts = [str(folder.resolve())]
    for name in _FINGERPRINT_FILES:
        path = folder / name
        if path.exists():
            stat = path.stat()
            parts.append(f"{name}:{stat.st_size}:{int(stat.st_mtime)}")
    return "|".join(parts)


def cache_entry(folder: Path, cache_dir: Path, options: OnnxBuildOptions) -> Path:
    """Where the build of `folder` with `options` lives: cache_dir/onnx/<folder name>-<tag>-<hash>."""
    from onnxruntime_genai import __version__ as og_version

    key = hashlib.sha256(f"{_fingerprint(folder)}|{options.tag}|og{og_version}|r{RECIPE}".encode()).hexdigest()[:12]
    return cache_dir / "onnx" / f"{folder.name}-{options.tag}-{key}"


def check_buildable(folder: Path) -> None:
    """Refuse models the engine cannot serve before spending time on a build (vision models, non-HF folders)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: not a Hugging Face model folder (no config.json)")
    config = json.loads(config_file.read_text())
    if "vision_config" in config:
        # The builder exports only the text decoder of Qwen2.5/3-VL; images need the transformers engine.
        raise ModelLoadError(
            f"{folder.name} is a vision-language model: LOADING_STRATEGY=onnx serves text-only models here "
            "(the ONNX builder exports only its text decoder); use LOADING_STRATEGY=transformers"
        )


def ensure_onnx_model(folder: Path, cache_dir: Path, options: OnnxBuildOptions) -> Path:
    """The ONNX model folder for `folder`, building it once into the cache (atomic: temp folder, then rename)."""
    check_buildable(folder)
    out = cache_entry(folder, cache_dir, options)
    if (out / "genai_config.json").is_file():
        log.info("ONNX model cached: %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _run_builder(folder, tmp, options)
        shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
        if options.last_token_logits:
            _gather_last_real_token(tmp / "model.onnx")
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same build first: keep theirs
            if not (out / "genai_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _run_builder(folder: Path, tmp: Path, options: OnnxBuildOptions) -> None:
    cmd = [_python(), "-m", BUILDER_MODULE, "-i", str(folder), "-o", str(tmp), "-c", str(tmp / "hf-cache")]
    cmd += options.builder_args()
    started = time.monotonic()
    log.info("building the %s ONNX model from %s (once; ~15 s) ...", options.tag, folder.name)
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout or ():  # never None: stdout=PIPE
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            # The quantizer logs one line per node: keep those at DEBUG, show the builder's own milestones.
            level = logging.DEBUG if "matmul_nbits_quantizer" in line or "Loading weights" in line else logging.INFO
            log.log(level, "onnx build [%4.1f s] %s", time.monotonic() - started, line)
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        detail = "\n".join(tail[-8:])
        raise ModelLoadError(f"ONNX model build failed for {folder.name} (exit {proc.returncode}):\n{detail}")
    log.info("built the %s ONNX model in %.1f s", options.tag, time.monotonic() - started)


def _gather_last_real_token(model_file: Path) -> None:
    from agent.engine.onnx.last_token import GraphEditError, gather_last_real_token

    try:
        gather_last_real_token(model_file)
    except GraphEditError as exc:
        raise ModelLoadError(f"ONNX model build: {exc}") from exc


def _python() -> str:
    """The interpreter to run the builder with. Inside Triton's python backend `sys.executable` is the backend stub,
    not Python, so fall back to this environment's own python3."""
    candidates = [sys.executable, str(Path(sys.prefix) / "bin" / "python3"), shutil.which("python3") or ""]
    for candidate in candidates:
        if candidate and Path(candidate).name.startswith("python") and Path(candidate).exists():
            return candidate
    raise ModelLoadError("cannot find a Python interpreter to run the ONNX model builder")
