"""The llama-server peer: where its build lives, how it is started, and that a recorded build is reused (nothing is
built here: `make test` never compiles llama.cpp)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import suite
from bench.peers import llama_server
from bench.workloads import random_workload

ROOT = Path(__file__).resolve().parents[3]


def test_the_build_is_keyed_by_version_flags_and_cpu(tmp_path: Path, monkeypatch) -> None:
    first = llama_server.install_dir(tmp_path)
    assert first.parent == tmp_path / "tools" and llama_server.LLAMA_CPP_PYTHON in first.name
    monkeypatch.setattr(llama_server, "CMAKE_FLAGS", (*llama_server.CMAKE_FLAGS, "-DGGML_AVX512=OFF"))
    assert llama_server.install_dir(tmp_path) != first


def test_the_pinned_flags_build_for_this_cpu_without_downloads() -> None:
    flags = set(llama_server.CMAKE_FLAGS)
    assert {"-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF"} <= flags
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in flags  # ON fetches the web UI from the Hugging Face hub


def test_a_recorded_build_is_reused_not_rebuilt(tmp_path: Path, monkeypatch) -> None:
    target = llama_server.install_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "llama-server").write_text("#!/bin/sh\n")
    (target / "build.json").write_text(json.dumps({"cmake_flags": list(llama_server.CMAKE_FLAGS)}))

    def no_build(*args: object) -> None:
        raise AssertionError("rebuilt a recorded build")

    monkeypatch.setattr(llama_server, "_download_and_build", no_build)
    assert llama_server.ensure_built(tmp_path) == target / "llama-server"
    assert llama_server.build_info(tmp_path) == {"cmake_flags": list(llama_server.CMAKE_FLAGS)}
    assert llama_server.build_info(tmp_path / "elsewhere") is None


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    def failing(work: Path, build_log: Path) -> None:
        build_log.write_text("cmake: error: no compiler\n")
        raise subprocess.CalledProcessError(1, ["cmake"])

    monkeypatch.setattr(llama_server, "_download_and_build", failing)
    try:
        llama_server.ensure_built(tmp_path)
    except RuntimeError as exc:
        assert "no compiler" in str(exc)
    else:
        raise AssertionError("a failed build must raise")
    assert not llama_server.install_dir(tmp_path).exists()
    assert not list(tmp_path.glob("llama-build-*"))


def test_the_command_sets_threads_slots_and_context() -> None:
    cmd = llama_server.command(Path("/x/llama-server"), Path("/m.gguf"), 5000, threads=2, parallel=8, ctx=8192)
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "/x/llama-server"
    assert (args["-m"], args["-t"], args["-np"], args["-c"]) == ("/m.gguf", "2", "8", "8192")
    assert (args["--host"], args["--port"]) == ("127.0.0.1", "5000")


@pytest.mark.slow
def test_the_peer_is_restarted_per_level_with_one_slot_per_client(tmp_path: Path, monkeypatch) -> None:
    """run_llama_server against a stand-in binary (the FastAPI door over FakeEngine): -np follows the level."""
    argv_log = tmp_path / "argv.jsonl"
    binary = tmp_path / "llama-server"
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).with_name("fake_llama_server.py")} "$@"\n')
    binary.chmod(0o755)
    monkeypatch.setenv("FAKE_LLAMA_ARGV_LOG", str(argv_log))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    plan = suite.Plan(levels=[1, 3], repeats=1, per_level=1, tokens=4, workloads=[random_workload(16)])
    figures = suite.run_llama_server(plan, binary, Path("/model.gguf"), tmp_path)
    rows = figures["random"]["llama_server"]
    assert [(r["concurrency"], r["errors"], r["tokens"]) for r in rows] == [(1, 0, 16), (3, 0, 16)]
    started = [json.loads(line) for line in argv_log.read_text().splitlines()]
    slots = [(a[a.index("-np") + 1], a[a.index("-c") + 1]) for a in started]
    assert slots == [("1", str(suite.LLAMA_CTX_PER_SLOT)), ("3", str(3 * suite.LLAMA_CTX_PER_SLOT))]
