"""The stack `make run` ships, as a real process for the reliability tests: `dsa-agent up` = Triton (the ONNX int4
engine on the embedded SmolLM2: the CPU default) behind FastAPI in gateway mode, on free ports.

`shipped_stack` is session-scoped and shared by every module that uses it (started by the first, stopped when the
last is done), so the whole suite pays for one start-up (~10-20 s here). Tests that stop a stack start their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.serving.live import ROOT, free_port
from tests.serving.triton.triton_fixtures import RunningTriton

# Settings every newbie-app variable could carry in from the caller's environment: dropped, so the defaults show.
_OWN_SETTINGS = {"MODEL_PATH", "LOADING_STRATEGY", "QUANTIZATION_TYPE", "DTYPE", "DEVICE", "API_KEYS"}


@dataclass
class StackProcess:
    """`python -m agent.cli up` in its own process group; output goes to `log_path`."""

    work: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=lambda: {k: free_port() for k in ("api", "http", "grpc", "metrics")})
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def triton_http(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def triton_grpc(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def log_path(self) -> Path:
        return self.work / "stack.log"

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if k.upper() not in _OWN_SETTINGS}
        return {
            **base,
            "PYTHONPATH": str(ROOT),
            "TRITON_HTTP_URL": self.triton_http,
            "TRITON_GRPC_URL": self.triton_grpc,
            "TRITON_METRICS_PORT": str(self.ports["metrics"]),
            "HISTORY_DB": str(self.work / "history.sqlite3"),
            "NEWBIE_TRITON_REPOSITORY": str(self.work / "triton-models"),
            "TOKENIZERS_PARALLELISM": "false",
            **self.extra_env,
        }

    def start(self, timeout: float = 300.0) -> StackProcess:
        self.work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "agent.cli", "up", "--host", "127.0.0.1", "--port", str(self.ports["api"])]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.work, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"stack exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"stack not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def triton_get(self, path: str) -> int:
        """Status of a GET on Triton's HTTP port."""
        return httpx.get(f"http://{self.triton_http}{path}", timeout=10).status_code

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole group if it does not exit (test clean-up)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # only this stack's group; normally already gone
        self.proc.wait()


_RUNNING: dict[str, list] = {}


@pytest.fixture(scope="session")
def shipped_stack(smollm_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    """One `dsa-agent up` for the session, on the shipped defaults (ONNX int4 in Triton, FastAPI gateway), with
    small limits so overload shows quickly. (`smollm_folder`: the embedded model is converted before it starts.)"""
    entry = _RUNNING.get("shipped")
    if entry is None:
        stack = StackProcess(tmp_path_factory.mktemp("shipped-stack"), dict(SHIPPED_LIMITS)).start()
        entry = _RUNNING["shipped"] = [stack, 0]
    entry[1] += 1
    try:
        yield entry[0]
    finally:
        entry[1] -= 1
        if entry[1] <= 0:
            _RUNNING.pop("shipped")[0].stop()


# Small enough to overload on purpose, and the FastAPI hostile corpus's limits (tests/serving/test_hostile_inputs.py
# LIMITS, except MAX_NEW_TOKENS: the soak's hung-up streams ask for 256 tokens).
SHIPPED_LIMITS = {
    "MAX_CONCURRENT_REQUESTS": "2",
    "MAX_QUEUE": "2",
    "MAX_NEW_TOKENS": "256",
    "TEMPERATURE": "0",
    "GRACEFUL_SHUTDOWN_SECONDS": "5",
    "MAX_BODY_BYTES": str(256 * 1024),
    "MAX_MESSAGE_CHARS": "2000",
    "MAX_IMAGE_BYTES": str(64 * 1024),
    "MAX_IMAGE_PIXELS": "1000000",
    "MAX_IMAGES_PER_REQUEST": "2",
    "MAX_STOP_CHARS": "16",
}


def triton_view(stack: StackProcess) -> RunningTriton:
    """The stack's Triton seen like the Triton test servers (`get`, `post`, `metric`, ...): started elsewhere."""
    from agent.serving.triton.launcher import TritonConfig, TritonServer

    cfg = TritonConfig(
        http_port=stack.ports["http"], grpc_port=stack.ports["grpc"], metrics_port=stack.ports["metrics"]
    )
    return RunningTriton(TritonServer(cfg), stack.work / "no-prompt-log.jsonl", stack.log_path)
