"""Export (once) and cache the OpenVINO IR of a Hugging Face folder, with optimum-intel in its own venv.

`optimum-cli export openvino` runs in the pinned export venv (agent.engine.openvino.export_env) as a subprocess: the
serving env has only the OpenVINO runtime, and the exporter's ~2 GB peak (torch tracing) goes back to the OS when it
ends. The IR is written into a temporary folder beside the cache entry and renamed into place, so a half-exported
model is never loaded. The entry is keyed by the checkpoint's content (sizes and the first/last MiB of its config,
weights, tokenizer and processor files), the export options, the pins of the export venv and RECIPE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config import Quantization
from agent.engine.errors import ModelLoadError
from agent.engine.openvino.export_env import EXPORT_PINS, export_env_ready, export_python

log = logging.getLogger(__name__)

# Bumped when the export command or what we do to its output changes, so older cached exports are not reused.
RECIPE = 1
# Architectures (config.json "model_type") this engine serves; optimum-intel exports many more, but these are the
# ones tested here (text decoders the CB pipeline runs, and Qwen3-VL through its VLM path).
TEXT_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"})
VISION_MODEL_TYPES = frozenset({"qwen3_vl"})
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".txt")
_HEAD = 1 << 20
# The file whose presence marks a finished export (written by the tokenizer conversion, the exporter's last step).
_DONE = "openvino_detokenizer.xml"
# int4 group sizes tried, in order: NNCF needs one that divides every quantized layer's input channels (optimum's
# default 128 does not divide SmolLM2-135M's 576). Groups of 32 measured perplexity 1.28x fp32 on SmolLM2 against
# 1.39x for 64, at the same speed within noise (docs/openvino.md); the ONNX engine's int4 uses blocks of 32 too.
_INT4_GROUPS = (32, 16)


@dataclass(frozen=True)
class ExportOptions:
    """What the exporter is asked for: weight format ("int4" | "int8" | "fp32") and, for int4, the group size."""

    weight_format: str = "int8"
    group_size: int | None = None

    @property
    def tag(self) -> str:
        return self.weight_format + (f"-g{self.group_size}" if self.group_size else "")

    def cli_args(self) -> list[str]:
        args = ["--weight-format", self.weight_format]
        if self.group_size:
            args += ["--group-size", str(self.group_size)]
        return args


_FORMATS = {Quantization.int4: "int4", Quantization.int8: "int8", Quantization.none: "fp32"}


def export_options(quantization: Quantization, config: dict) -> ExportOptions:
    """QUANTIZATION_TYPE -> export options: int4 (group size dividing the model's channels), int8, none = fp32."""
    fmt = _FORMATS.get(quantization)
    if fmt is None:
        raise ModelLoadError(
            f"QUANTIZATION_TYPE={quantization.value} is not available with LOADING_STRATEGY=openvino: "
            "use int4, int8 or none (fp32)"
        )
    if fmt != "int4":
        return ExportOptions(fmt)
    text = config.get("text_config") or config
    channels = [text.get("hidden_size"), text.get("intermediate_size")]
    channels = [c for c in channels if isinstance(c, int) and c > 0]
    for group in _INT4_GROUPS:
        if all(c % group == 0 for c in channels):
            return ExportOptions(fmt, group)
    raise ModelLoadError(f"QUANTIZATION_TYPE=int4: no int4 group size divides the model's channels {channels}")


def read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(config_file.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({exc})") from exc


def model_kind(config: dict) -> str:
    """ "vision" or "text", or ModelLoadError for an architecture this engine does not serve."""
    model_type = config.get("model_type", "")
    if model_type in VISION_MODEL_TYPES:
        return "vision"
    if "vision_config" in config:
        raise ModelLoadError(
            f"model_type={model_type!r}: LOADING_STRATEGY=openvino serves the vision models "
            f"{sorted(VISION_MODEL_TYPES)} only; use LOADING_STRATEGY=transformers"
        )
    if model_type in TEXT_MODEL_TYPES:
        return "text"
    raise ModelLoadError(
        f"model_type={model_type!r} is not supported by LOADING_STRATEGY=openvino here "
        f"(text: {sorted(TEXT_MODEL_TYPES)}; vision: {sorted(VISION_MODEL_TYPES)}); use LOADING_STRATEGY=transformers"
    )


def fingerprint(folder: Path) -> str:
    """The checkpoint's content key: each relevant file's name, size and a hash of its first and last MiB."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}:".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(_HEAD))
            if size > 2 * _HEAD:
                fh.seek(-_HEAD, os.SEEK_END)
                digest.update(fh.read(_HEAD))
    return digest.hexdigest()


def cache_entry(folder: Path, cache_dir: Path, options: ExportOptions) -> Path:
    """Where the export of `folder` with `options` lives: cache_dir/openvino/<folder name>-<tag>-<key>."""
    key = hashlib.sha256(f"{fingerprint(folder)}|{options.tag}|{'|'.join(EXPORT_PINS)}|r{RECIPE}".encode())
    return cache_dir / "openvino" / f"{folder.name}-{options.tag}-{key.hexdigest()[:12]}"


def ensure_openvino_model(folder: Path, cache_dir: Path, options: ExportOptions, *, kind: str) -> Path:
    """The OpenVINO model folder for `folder`, exported once into the cache (atomic: temp folder, then rename)."""
    out = cache_entry(folder, cache_dir, options)
    if (out / _DONE).is_file():
        log.info("OpenVINO model cached: %s", out)
        return out
    python = export_python(cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _run_export(python, folder, tmp, options, kind)
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same export first: keep theirs
            if not (out / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _run_export(python: Path, folder: Path, tmp: Path, options: ExportOptions, kind: str) -> None:
    task = "image-text-to-text" if kind == "vision" else "text-generation-with-past"
    cli = python.parent / "optimum-cli"
    cmd = [str(cli), "export", "openvino", "--model", str(folder), "--task", task, *options.cli_args(), str(tmp)]
    # A clean environment for the tool venv: none of the serving env's paths, and never the hub (offline here).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PATH=f"{python.parent}:{env.get('PATH', '')}")
    started = time.monotonic()
    log.info("exporting %s to OpenVINO %s (once) ...", folder.name, options.tag)
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, cwd=tmp.parent
        )
    except OSError as exc:
        raise ModelLoadError(f"OpenVINO export could not start ({cli}: {exc}); run `make install`") from exc
    with proc:
        for line in proc.stdout or ():  # never None: stdout=PIPE
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            log.debug("openvino export [%5.1f s] %s", time.monotonic() - started, line)
    if proc.returncode != 0 or not (tmp / _DONE).is_file():
        detail = "\n".join(tail[-10:])
        raise ModelLoadError(
            f"OpenVINO export ({options.tag}) failed for {folder.name} (exit {proc.returncode}):\n{detail}"
        )
    log.info("exported %s to OpenVINO %s in %.1f s", folder.name, options.tag, time.monotonic() - started)


def unavailable_reason(folder: Path, cache_dir: Path, quantization: Quantization) -> str | None:
    """Why LOADING_STRATEGY=auto should not pick this engine for `folder` (None: it can). Cheap: no export runs."""
    import importlib.util

    if importlib.util.find_spec("openvino_genai") is None:
        return "openvino-genai is not installed"
    try:
        config = read_config(folder)
        options = export_options(quantization, config)
        model_kind(config)
    except ModelLoadError as exc:
        return exc.message
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return "no safetensors weights to export"
    if (cache_entry(folder, cache_dir, options) / _DONE).is_file():
        return None
    if not export_env_ready(cache_dir):
        return "its export environment is missing (make install)"
    return None


def export_for(folder: Path, cache_dir: Path, quantization: Quantization) -> Path:
    """Export `folder` for QUANTIZATION_TYPE `quantization` once (the engine's own start does the same)."""
    config = read_config(folder)
    return ensure_openvino_model(folder, cache_dir, export_options(quantization, config), kind=model_kind(config))
