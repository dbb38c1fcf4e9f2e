"""docs/architecture.md names modules, classes and files: each must exist, so a rename that forgets the page fails."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
# Dotted names (`agent.engine.limits`, `agent.engine.base.final_chunk`) and file paths (`agent/serving/.../model.py`).
DOTTED = sorted(set(re.findall(r"\bagent(?:\.[A-Za-z_]\w*)+", DOC)))
PATHS = sorted(set(re.findall(r"\bagent/[\w./-]+\.\w+", DOC)))


def resolve(name: str) -> object:
    """Import the longest module prefix of `name`, then look the rest up as attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is not None and not name.startswith(exc.name):
                raise  # the module exists but a dependency of it is missing: a real failure
            continue
        for attr in parts[cut:]:
            target = getattr(target, attr)
        return target
    raise ModuleNotFoundError(name)


def test_the_page_names_the_modules_of_each_path() -> None:
    assert len(DOTTED) >= 25 and PATHS  # the regexes still find the names (a reformatted page is caught here)
    for needed in ("agent.engine.limits", "agent.serving.triton.gateway", "agent.serving.inference_engine"):
        assert needed in DOTTED


@pytest.mark.parametrize("name", DOTTED)
def test_every_named_module_and_object_exists(name: str) -> None:
    assert resolve(name) is not None


@pytest.mark.parametrize("path", PATHS)
def test_every_named_file_exists(path: str) -> None:
    assert (ROOT / path).is_file(), path
