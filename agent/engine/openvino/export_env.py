"""The pinned tool environment that exports Hugging Face folders to OpenVINO IR (optimum-intel), created once.

Why a separate venv: optimum-intel 2.2's exporter refuses transformers newer than 5.0 ("Maximum required is 5.0";
5.1-5.5 also omit the VL model's preprocessor_config.json), while the serving env runs transformers 5.19. The serving
env therefore gets only the OpenVINO *runtime* (openvino, openvino-genai, openvino-tokenizers: requirements.txt) and
the export runs here, as a subprocess (docs/openvino.md).

The venv lives in MODEL_CACHE_DIR/tools/openvino-export-<hash of the pins>, outside git; `make install` creates it
(`python -m agent.engine.openvino.export_env`). It is complete once its stamp file exists (written last), so an
interrupted install is redone, never half used.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from agent.engine.errors import ModelLoadError

log = logging.getLogger(__name__)

# One pip command, so the resolver sees every pin at once. torch==2.13.0 takes the local CPU wheel (unpinned, pip
# pulls a multi-GB CUDA torch); transformers==5.0.0 is the newest optimum-intel 2.2 accepts; openvino-genai pins
# openvino and openvino-tokenizers of the same release as the serving env's runtime (requirements.txt).
EXPORT_PINS = (
    "torch==2.13.0",
    "optimum-intel==2.2.0",
    "nncf==3.4.0",
    "transformers==5.0.0",
    "openvino==2026.4.1",
    "openvino-tokenizers==2026.4.1.0",
    "openvino-genai==2026.4.1.0",
)
# PyPI's torchvision is a CUDA build that fails beside CPU torch ("operator torchvision::nms does not exist") and
# breaks optimum-intel's imports; the exporter does not need it.
REMOVE = ("torchvision", "torchaudio", "torchcodec")
_STAMP = ".export-env-ready"  # written last: the venv is complete


def export_env_dir(cache_dir: Path) -> Path:
    """Where the export venv for the current pins lives."""
    key = hashlib.sha256("\n".join(EXPORT_PINS + REMOVE).encode()).hexdigest()[:10]
    return cache_dir / "tools" / f"openvino-export-{key}"


def export_env_ready(cache_dir: Path) -> bool:
    """The export venv for the current pins exists and finished installing."""
    return (export_env_dir(cache_dir) / _STAMP).is_file()


def export_python(cache_dir: Path) -> Path:
    """The export venv's interpreter; ModelLoadError naming the fix when the venv was never created."""
    venv = export_env_dir(cache_dir)
    python = venv / "bin" / "python"
    if not (venv / _STAMP).is_file() or not python.exists():
        raise ModelLoadError(
            f"the OpenVINO export environment is missing ({venv}): run `make install` "
            "(or `python -m agent.engine.openvino.export_env`) once"
        )
    return python


def ensure_export_env(cache_dir: Path, base_python: str | None = None) -> Path:
    """Create the export venv once (minutes: pip installs torch, optimum-intel, nncf); returns its folder."""
    venv = export_env_dir(cache_dir)
    if (venv / _STAMP).is_file():
        return venv
    shutil.rmtree(venv, ignore_errors=True)  # an interrupted earlier attempt
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    steps = [
        [base_python or _base_python(), "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", "-q", *EXPORT_PINS],
        [str(python), "-m", "pip", "uninstall", "-q", "-y", *REMOVE],
        [str(python), "-c", "import optimum.intel, openvino, nncf, transformers; print(transformers.__version__)"],
    ]
    for cmd in steps:
        log.info("openvino export env: %s", " ".join(cmd[1:]))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise ModelLoadError(
                f"creating the OpenVINO export environment failed at `{' '.join(cmd[1:4])} ...`:\n"
                + (done.stderr or done.stdout)[-2000:]
            )
    (venv / _STAMP).write_text("\n".join(EXPORT_PINS) + "\n")
    log.info("openvino export env ready: %s", venv)
    return venv


def _base_python() -> str:
    """A real Python to create the venv with (inside Triton's python backend sys.executable is the stub)."""
    for candidate in (sys.executable, str(Path(sys.prefix) / "bin" / "python3"), shutil.which("python3") or ""):
        if candidate and Path(candidate).name.startswith("python") and Path(candidate).exists():
            return candidate
    raise ModelLoadError("cannot find a Python interpreter to create the OpenVINO export environment")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create the pinned OpenVINO export venv (once).")
    parser.add_argument("--cache-dir", type=Path, default=None, help="MODEL_CACHE_DIR (default: the setting)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cache_dir is None:
        from agent.config import load_settings

        args.cache_dir = load_settings().model_cache_dir
    print(ensure_export_env(args.cache_dir))  # noqa: T201  # the CLI's answer: the venv's path
    return 0


if __name__ == "__main__":
    sys.exit(main())
