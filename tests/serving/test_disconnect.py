"""A client that goes away aborts its engine request (streaming and not), through a real uvicorn server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agent.config import load_settings
from agent.engine.fake import FakeEngine
from agent.serving.model_server import create_app
from tests.serving.live import serving, wait_until

pytestmark = pytest.mark.slow

LONG = "word " * 60  # FakeEngine echoes it one word per step: ~3 s at 0.05 s a step


class RecordingEngine(FakeEngine):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.aborted: list[str] = []

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        await super().abort(request_id)


@pytest.fixture
async def engine_and_url(tmp_path: Path) -> AsyncIterator[tuple[RecordingEngine, str]]:
    engine = RecordingEngine(step_delay=0.05)
    await engine.start()
    app = create_app(load_settings(history_db=tmp_path / "h.sqlite3"), engine)
    async with serving(app) as url:
        yield engine, url


async def test_stream_disconnect_aborts(engine_and_url: tuple[RecordingEngine, str]) -> None:
    engine, url = engine_and_url
    async with httpx.AsyncClient(base_url=url) as client:
        async with client.stream("POST", "/chat", json={"message": LONG, "stream": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break  # one event, then hang up
        assert await wait_until(lambda: len(engine.aborted) == 1), "engine request not aborted"
        assert await wait_until(lambda: engine.stats.running == 0)
        assert (await client.get("/history")).json()["history"] == []  # not stored
        assert (await client.get("/health")).json()["running"] == 0


async def test_openai_stream_disconnect_aborts(engine_and_url: tuple[RecordingEngine, str]) -> None:
    engine, url = engine_and_url
    body = {"messages": [{"role": "user", "content": LONG}], "stream": True}
    async with httpx.AsyncClient(base_url=url) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break
        assert await wait_until(lambda: len(engine.aborted) == 1), "engine request not aborted"


async def test_plain_request_disconnect_aborts(engine_and_url: tuple[RecordingEngine, str]) -> None:
    engine, url = engine_and_url
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5.0, read=0.3)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/chat", json={"message": LONG})
    assert await wait_until(lambda: len(engine.aborted) == 1), "engine request not aborted"
    assert await wait_until(lambda: engine.stats.running == 0)
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/history")).json()["history"] == []
