"""The history-write bench on both stores, briefly (a real SQLite file and a real PostgreSQL cluster)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.devtools.pg_cluster import PgCluster
from bench.history_store import measure


@pytest.mark.slow
def test_measures_both_stores(tmp_path: Path) -> None:
    sqlite = asyncio.run(measure(str(tmp_path / "h.sqlite3"), chats=4, turns=3))
    cluster = PgCluster().start()
    try:
        postgres = asyncio.run(measure(cluster.url, chats=4, turns=3))
    finally:
        cluster.destroy()
    for figures in (sqlite, postgres):
        assert figures["turns"] == 12
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] and figures["turns_per_s"] > 0
