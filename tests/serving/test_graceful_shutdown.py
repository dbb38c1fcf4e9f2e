"""Graceful shutdown's deadline: a stream still running after GRACEFUL_SHUTDOWN_SECONDS is cut and its engine request
aborted, so the server exits on time. (The drain itself, in a real `dsa-agent serve` process under SIGTERM, is in
tests/serving/test_server_process.py.) Real uvicorn, deterministic FakeEngine: one word every 50 ms."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from sse_starlette.sse import AppStatus

from agent.config import load_settings
from agent.engine.fake import FakeEngine
from agent.serving.model_server import create_app

pytestmark = pytest.mark.slow

DEADLINE = 1.0  # s
LONG = "word " * 200  # 10 s of output at 50 ms a word


class RecordingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__(step_delay=0.05)
        self.aborted: list[str] = []

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        await super().abort(request_id)


@pytest.fixture
def draining_streams() -> Iterator[None]:
    """What `dsa-agent serve` sets: SSE streams drain on shutdown instead of ending at the signal."""
    AppStatus.disable_automatic_graceful_drain()
    try:
        yield
    finally:
        AppStatus.enable_automatic_graceful_drain_mode()


async def test_stream_past_the_deadline_is_cut_and_aborted(tmp_path: Path, draining_streams: None) -> None:
    engine = RecordingEngine()
    await engine.start()
    app = create_app(load_settings(history_db=tmp_path / "h.sqlite3", graceful_shutdown_seconds=DEADLINE), engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=DEADLINE)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    deltas_after_signal = 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        client.stream("POST", "/chat", json={"message": LONG, "stream": True}) as response,
    ):
        lines = response.aiter_lines()
        async for line in lines:
            if line.startswith("data: "):
                break
        server.should_exit = True  # what SIGTERM does
        signalled = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):  # cut at the deadline: the response never completes
            async for line in lines:
                if line.startswith("data: ") and "delta" in json.loads(line[6:]):
                    deltas_after_signal += 1
    await asyncio.wait_for(serving, timeout=DEADLINE + 10)
    elapsed = time.monotonic() - signalled
    assert DEADLINE <= elapsed < DEADLINE + 5, elapsed
    assert deltas_after_signal >= 5  # it kept streaming while draining (not ended at the signal) ...
    assert len(engine.aborted) == 1 and engine.stats.running == 0  # ... then its engine request was aborted
    assert engine.last_request is not None and engine.aborted == [engine.last_request.request_id]
