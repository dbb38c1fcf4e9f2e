"""The FastAPI door on a real PostgreSQL that goes away: start-up gives up naming the URL; mid-run requests that need
the store get 503 with Retry-After, /health says degraded, and everything recovers when the database is back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agent.config import load_settings
from agent.devtools.pg_cluster import PgCluster
from agent.engine.base import Engine
from agent.serving.model_server import create_app
from tests.serving.live import ROOT, free_port, serving

pytestmark = pytest.mark.slow


def test_unreachable_database_at_start_exits_non_zero_naming_the_url(tmp_path: Path) -> None:
    url = f"postgresql://app:hunter2@127.0.0.1:{free_port()}/newbie"
    env = {"PATH": "/usr/bin:/bin", "HISTORY_DB": url, "STORE_CONNECT_TIMEOUT": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "postgresql://app:***@127.0.0.1" in output and "hunter2" not in output


async def test_database_lost_mid_run_then_back(smollm_engine: Engine, pg_cluster: PgCluster, pg_url: str) -> None:
    settings = load_settings(history_db=pg_url, max_new_tokens=2, temperature=0.0)
    async with serving(create_app(settings, smollm_engine)) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        assert (await c.post("/chat", json={"message": "What is a stack?"})).status_code == 200
        assert (await c.get("/health")).json()["status"] == "ready"
        pg_cluster.stop("fast")
        try:
            health = await c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
            assert "postgresql" in health.json()["error"] and int(health.headers["retry-after"]) >= 1
            for response in (await c.get("/history"), await c.post("/chat", json={"message": "lost?"})):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["type"] == "store_unavailable"
                assert int(response.headers["retry-after"]) >= 1
        finally:
            pg_cluster.start()
        for _ in range(50):  # it recovers by itself: no restart of the app
            if (await c.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.2)
        assert (await c.get("/health")).json()["status"] == "ready"
        assert (await c.post("/chat", json={"message": "What is a queue?"})).status_code == 200
        history = (await c.get("/history")).json()["history"]
        assert [t["content"] for t in history[::2]] == ["What is a stack?", "What is a queue?"]
