"""Triton python-backend entry point for `qwen3-vl`: a thin shell over agent.serving.triton.backend.

The stub runs an isolated Python (PYTHONPATH is ignored), so `agent` must be importable: installed with
`pip install -e .` by `make install`, or found from NEWBIE_APP_ROOT (set by the launcher) or from this file's place
in the source tree (agent/serving/triton-models/qwen3-vl/1/model.py -> the repository root).
"""

from __future__ import annotations

import locale
import os
import sys
from pathlib import Path


def _utf8() -> None:
    # Triton's embedded Python starts with an ASCII locale and ignores LANG/PYTHONUTF8; torch's compiler then fails
    # reading its templates (UnicodeDecodeError). Switch before anything imports torch or vLLM.
    for name in ("C.UTF-8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_ALL, name)
            break
        except locale.Error:
            continue
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")


def _make_agent_importable() -> None:
    try:
        import agent  # noqa: F401

        return
    except ImportError:
        pass
    # The launcher's NEWBIE_APP_ROOT first, then every folder above this file (symlinks resolved).
    env_root = os.environ.get("NEWBIE_APP_ROOT", "")
    candidates = ([Path(env_root)] if env_root else []) + list(Path(__file__).resolve().parents)
    for root in candidates:
        if (root / "agent" / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            return
    raise ImportError("cannot import the `agent` package: `pip install -e .` the project or set NEWBIE_APP_ROOT")


_utf8()
_make_agent_importable()

import logging  # noqa: E402

import triton_python_backend_utils as pb_utils  # noqa: E402

from agent.serving.triton.backend import TritonBackend  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


class TritonPythonModel:
    """Decoupled model: every request of a batch goes to the shared engine at once; answers stream back."""

    def initialize(self, args: dict[str, str]) -> None:
        self.backend = TritonBackend(pb_utils)
        self.backend.initialize(args)

    def execute(self, requests: list) -> None:
        return self.backend.execute(requests)

    def finalize(self) -> None:
        self.backend.finalize()
