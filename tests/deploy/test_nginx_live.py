"""Real nginx (Debian's) with the project's nginx.conf in front of the running FastAPI (gateway) and Triton: only the
listen address and the upstream servers are templated to 127.0.0.1 ports."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from deploy_helpers import LiveStack, free_port, nginx_files, require_tool, stop_process, wait_http

from agent.config import Settings

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.triton]

QUESTION = "What is a binary tree?"


@pytest.fixture(scope="module")
def nginx_url(live_stack: LiveStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    prefix = tmp_path_factory.mktemp("nginx")
    listen = f"127.0.0.1:{free_port()}"
    _, args = nginx_files(prefix, listen, live_stack.fastapi, live_stack.triton_http, foreground=True)
    log = prefix / "nginx.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([require_tool("nginx"), *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://{listen}/nginx-health", 20, proc, log)
        yield f"http://{listen}"
    finally:
        stop_process(proc)


def sse_reads(response: httpx.Response) -> list[tuple[float, list[dict]]]:
    """Each network read of an SSE response: (arrival time, the complete `data:` events it finished)."""
    reads: list[tuple[float, list[dict]]] = []
    buffer = ""
    for raw in response.iter_raw():
        buffer = (buffer + raw.decode()).replace("\r\n", "\n")  # sse-starlette ends lines with CRLF
        *complete, buffer = buffer.split("\n\n")
        events = [json.loads(line[5:]) for block in complete for line in block.splitlines() if line.startswith("data:")]
        reads.append((time.monotonic(), [e for e in events if e != "[DONE]"]))
    return reads


def assert_incremental(reads: list[tuple[float, list[dict]]], minimum_reads: int = 3) -> None:
    with_events = [(t, events) for t, events in reads if events]
    assert len(with_events) >= minimum_reads, f"the stream arrived in {len(with_events)} piece(s), not incrementally"
    assert with_events[-1][0] - with_events[0][0] > 0.05, "all pieces arrived at once (buffered)"


def test_chat_through_nginx(nginx_url: str) -> None:
    payload = {"message": QUESTION, "temperature": 0, "max_new_tokens": 8}
    response = httpx.post(f"{nginx_url}/chat", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["response"].strip() and body["usage"]["completion_tokens"] > 0
    assert body["session_id"]


def test_chat_sse_stream_arrives_incrementally_through_nginx(nginx_url: str) -> None:
    payload = {"message": QUESTION, "stream": True, "temperature": 0, "max_new_tokens": 16}
    with httpx.stream("POST", f"{nginx_url}/chat", json=payload, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        reads = sse_reads(response)
    events = [e for _, batch in reads for e in batch]
    deltas = [e["delta"] for e in events if "delta" in e]
    assert events[-1].get("done") is True and "".join(deltas) == events[-1]["response"]
    assert_incremental(reads)


def test_triton_health_metadata_and_generate_stream_through_nginx(nginx_url: str) -> None:
    assert httpx.get(f"{nginx_url}/v2/health/ready", timeout=10).status_code == 200
    model = Settings.model_fields["triton_model_name"].default
    metadata = httpx.get(f"{nginx_url}/v2/models/{model}", timeout=10)
    assert metadata.status_code == 200 and metadata.json()["name"] == model
    payload = {"text_input": QUESTION, "max_tokens": 12, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", f"{nginx_url}/v2/models/{model}/generate_stream", json=payload, timeout=120) as response:
        assert response.status_code == 200, response.read()
        reads = sse_reads(response)
    events = [e for _, batch in reads for e in batch]
    assert "".join(e["text_output"] for e in events).strip()
    assert_incremental(reads)


def test_body_over_max_body_bytes_is_refused_by_nginx(nginx_url: str) -> None:
    limit = Settings.model_fields["max_body_bytes"].default
    body = b'{"message": "' + b"a" * (limit + 1024) + b'"}'
    response = httpx.post(f"{nginx_url}/chat", content=body, headers={"content-type": "application/json"}, timeout=60)
    # nginx's own 413 page: the body never reached the app.
    assert response.status_code == 413 and "nginx" in response.text


def test_web_ui_through_nginx(nginx_url: str) -> None:
    response = httpx.get(f"{nginx_url}/", timeout=10)
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
