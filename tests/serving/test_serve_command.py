"""`dsa-agent serve` as a user runs it: a real process with the real model loader, /load_model swaps, SIGTERM."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> list[int]:
    """Poll /health until 200; returns the statuses seen."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            status = httpx.get(f"{url}/health", timeout=5).status_code
            seen.append(status)
            if status == 200:
                return seen
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready after {timeout} s (statuses {seen[-5:]})")


def test_serve_loads_swaps_and_stops(tiny_vl_folder: Path, smollm_folder: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MODEL_PATH": str(tiny_vl_folder),
        "LOADING_STRATEGY": "transformers",
        "QUANTIZATION_TYPE": "none",
        "DTYPE": "float32",
        "IMAGE_MAX_PIXELS": str(128 * 128),
        "MAX_NEW_TOKENS": "8",
        "HISTORY_DB": str(tmp_path / "history.sqlite3"),
        "PORT": "1",  # overridden by --port
    }
    cmd = [sys.executable, "-m", "agent.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        seen = wait_ready(url, proc)
        assert set(seen) <= {200, 503}
        with httpx.Client(base_url=url, timeout=120) as client:
            assert client.get("/health").json()["model"]["supports_images"] is True
            image = png_b64()
            assert client.post("/chat", json={"message": "What is this?", "image_base64": image}).status_code == 200

            failed = client.post("/load_model", json={"model_path": str(tmp_path / "no-such-model")})
            assert failed.status_code == 422 and failed.json()["error"]["type"] == "model_load_failed"
            assert client.get("/health").json()["model"]["model_path"] == str(tiny_vl_folder)  # still serving

            swapped = client.post("/load_model", json={"model_path": str(smollm_folder)})
            assert swapped.status_code == 200, swapped.text
            assert swapped.json()["model"]["supports_images"] is False
            refused = client.post("/chat", json={"message": "And this?", "image_base64": image})
            assert refused.status_code == 400 and "load_model" in refused.json()["error"]["message"]
            answer = client.post("/chat", json={"message": "What is a binary tree?", "temperature": 0})
            assert answer.status_code == 200 and answer.json()["response"].strip()
            assert len(client.get("/history").json()["history"]) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    log = out.decode(errors="replace")
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -SIGTERM).
    assert proc.returncode in (0, -signal.SIGTERM), log[-3000:]
    assert "Application shutdown complete" in log
    assert "shutting down the replaced engine (tiny-qwen3vl)" in log
