"""llama.cpp's `llama-server` as a benchmark peer, on the embedded SmolLM2 GGUF itself (the file our engines convert).

Built once into the model cache from a pinned source package on PyPI: the `llama-cpp-python` sdist carries llama.cpp's
sources under vendor/llama.cpp, so pip (the one registry these machines reach) is enough. Only the `llama-server`
target is built (~15 min on 2 cores), statically, for this CPU (GGML_NATIVE), with the web UI left out (its assets
would be downloaded from the Hugging Face hub). The flags are recorded beside the binary (build.json) and copied into
the results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.targets import server

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built; bump it to move llama.cpp
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # this CPU's instruction sets (the binary lives in this machine's cache)
    "-DLLAMA_CURL=OFF",  # no model downloads (deprecated in newer llama.cpp: a warning, no effect)
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ON would fetch the web UI from the Hugging Face hub at build time
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary to keep
)
BUILD_JOBS = int(os.environ.get("LLAMA_BUILD_JOBS", "2"))


def _cpu_key() -> str:
    """The build is native: a cache shared between machines keeps one binary per CPU model and flags."""
    from agent.engine.cpu import cpu_features

    cpu = cpu_features()
    return hashlib.sha256(f"{cpu.model}|{' '.join(sorted(cpu.flags))}".encode()).hexdigest()[:10]


def install_dir(cache_dir: Path) -> Path:
    """Where this version, these flags and this CPU's build lives."""
    key = hashlib.sha256(" ".join(CMAKE_FLAGS).encode()).hexdigest()[:8]
    return cache_dir / "tools" / f"llama.cpp-{LLAMA_CPP_PYTHON}-{key}-{_cpu_key()}"


def build_info(cache_dir: Path) -> dict | None:
    """The recorded build (version, flags, compiler, minutes), or None if not built yet."""
    path = install_dir(cache_dir) / "build.json"
    return json.loads(path.read_text()) if path.exists() else None


def _run(cmd: list[str], cwd: Path, log_file: Path) -> None:
    with open(log_file, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=True)


def ensure_built(cache_dir: Path) -> Path:
    """The llama-server binary, built first if missing. Nice 19: a build must not slow what else runs here."""
    target = install_dir(cache_dir)
    binary = target / "llama-server"
    if binary.exists() and (target / "build.json").exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-build-", dir=cache_dir) as tmp:
        work = Path(tmp)
        build_log = work / "build.log"
        log.info("building llama-server %s into %s (~15 min on 2 cores; log %s)", LLAMA_CPP_PYTHON, target, build_log)
        started = time.monotonic()
        try:
            _download_and_build(work, build_log)
        except subprocess.CalledProcessError as exc:
            tail = build_log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"llama-server build failed ({exc}):\n{tail}") from exc
        staging = work / "install"
        staging.mkdir()
        shutil.copy2(work / "build" / "bin" / "llama-server", staging / "llama-server")
        info = {
            "source": f"llama-cpp-python=={LLAMA_CPP_PYTHON} sdist (PyPI), vendor/llama.cpp",
            "sdist_sha256": _sdist_sha256(work),
            "cmake_flags": list(CMAKE_FLAGS),
            "target": "llama-server",
            "jobs": BUILD_JOBS,
            "compiler": _first_line(["c++", "--version"]),
            "cpu": _cpu_key(),
            "build_minutes": round((time.monotonic() - started) / 60, 1),
            "platform": platform.platform(),
        }
        (staging / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # in place only once complete: a crash never leaves a half-built binary
    log.info("built llama-server in %.1f min", info["build_minutes"])
    return binary


def _download_and_build(work: Path, build_log: Path) -> None:
    pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    _run([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(work)], work, build_log)
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(work / "src", members=[m for m in members if m.name], filter="data")
    nice = ["nice", "-n", "19"]
    _run([*nice, "cmake", "-S", "src", "-B", "build", "-G", "Ninja", *CMAKE_FLAGS], work, build_log)
    _run([*nice, "cmake", "--build", "build", "--target", "llama-server", "-j", str(BUILD_JOBS)], work, build_log)


def _sdist_sha256(work: Path) -> str:
    """The sdist's hash: it names the exact sources (the vendored llama.cpp has no git metadata to report)."""
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"), None)
    return hashlib.sha256(sdist.read_bytes()).hexdigest() if sdist else "unknown"


def _first_line(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return "unknown"


def command(binary: Path, gguf: Path, port: int, threads: int, parallel: int, ctx: int) -> list[str]:
    """`llama-server` as the peer runs: threads = cores, parallel slots = concurrency, `ctx` tokens shared by the
    slots (llama-server splits -c among -np), its default prompt cache left on."""
    return [
        str(binary),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-np",
        str(parallel),
        "-c",
        str(ctx),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-webui",
    ]


@contextlib.contextmanager
def llama_server(
    binary: Path, gguf: Path, port: int, threads: int, parallel: int, ctx: int, log_path: Path
) -> Iterator[subprocess.Popen]:
    """Run llama-server on 127.0.0.1:`port` until the block ends (ready when /health answers 200)."""
    cmd = command(binary, gguf, port, threads, parallel, ctx)
    with server(cmd, f"http://127.0.0.1:{port}/health", {}, log_path, timeout=120) as proc:
        yield proc


def main() -> int:
    """`make llama-server`: build (if missing) and say where the binary is and how it was built."""
    from agent.config import load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cache = load_settings().model_cache_dir
    binary = ensure_built(cache)
    sys.stdout.write(f"{binary}\n{json.dumps(build_info(cache), indent=2)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
