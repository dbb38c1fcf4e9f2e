"""The seed's quick start for real on a machine without Docker: `./triton-docker/start-services.sh` starts Triton and
FastAPI (gateway) locally; a chat answers through FastAPI and Triton is ready; SIGTERM stops the whole stack."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from deploy_helpers import ROOT, clean_env, free_port, wait_http

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.triton]


def test_start_services_runs_the_local_stack(smollm_folder: Path, tmp_path: Path) -> None:
    """`./triton-docker/start-services.sh` without Docker = `make run`'s stack, on the default settings.

    (`smollm_folder` only makes sure the embedded model is converted before the stack starts.)"""
    ports = {name: free_port() for name in ("fastapi", "http", "grpc", "metrics")}
    env = clean_env() | {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",  # no docker client: the script must choose the local stack
        "PORT": str(ports["fastapi"]),
        "TRITON_HTTP_URL": f"127.0.0.1:{ports['http']}",
        "TRITON_GRPC_URL": f"127.0.0.1:{ports['grpc']}",
        "TRITON_METRICS_PORT": str(ports["metrics"]),
        "HISTORY_DB": str(tmp_path / "history.sqlite3"),
        # Otherwise the defaults, as `make run` has them: the embedded model, QUANTIZATION_TYPE=int4, auto engine.
        "MAX_NEW_TOKENS": "8",
    }
    log = tmp_path / "stack.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["./triton-docker/start-services.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: nothing it started can outlive the test
        )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{ports['fastapi']}/health", 300, proc, log)
        assert httpx.get(f"http://127.0.0.1:{ports['http']}/v2/health/ready", timeout=5).status_code == 200
        health = httpx.get(f"http://127.0.0.1:{ports['fastapi']}/health", timeout=5).json()
        # FastAPI in gateway mode in front of Triton, whose model runs the CPU default for int4: the ONNX engine.
        assert health["engine"] == "triton/onnx" and health["model"]["model_name"] == "SmolLM2-135M-Instruct"
        answer = httpx.post(f"http://127.0.0.1:{ports['fastapi']}/chat", json={"message": "Hi"}, timeout=120)
        assert answer.status_code == 200 and answer.json()["response"].strip()
        assert "no Docker daemon" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # only this test's group; normally already gone
        proc.wait()
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
