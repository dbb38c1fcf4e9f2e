"""History-write latency of both stores: 32 chats writing turns at once (`make bench` runs it after the doors).

Each chat owns a session and writes --turns turns back to back, as the FastAPI door does after each answer: the turn
(user + assistant, one transaction) and the principal's usage row. Latency is per turn (both writes), from many
chats at once, so it includes waiting for the database's write lock (SQLite: one writer at a time; PostgreSQL:
row locks per session). SQLite runs with synchronous=FULL, PostgreSQL with fsync on (a throwaway cluster from
Debian's `postgresql` package, agent/devtools/pg_cluster.py), both on this machine's disk.

    python -m bench.history_store [--chats 32] [--turns 20]
Output: bench/results/<date>-history-store.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from agent.devtools.pg_cluster import PgCluster
from agent.serving.api.store import Store, open_store

log = logging.getLogger("bench.history_store")
RESULTS = Path(__file__).parent / "results"
ANSWER = "A binary tree is a tree in which every node has at most two children. " * 6  # ~450 chars, a short answer


async def _chat(store: Store, chat: int, turns: int, latencies: list[float]) -> None:
    session = await store.create(owner=f"learner{chat}")
    for turn in range(turns):
        started = time.perf_counter()
        await store.append_turn(session, f"question {turn} of chat {chat}: what is a heap?", ANSWER)
        await store.record_usage(f"learner{chat}", "learner", 120, 96)
        latencies.append(time.perf_counter() - started)


async def measure(target: str, chats: int, turns: int) -> dict[str, float]:
    """p50/p99 turn-write latency (ms) and turns/s with `chats` concurrent chats against `target`."""
    store = await open_store(target, pool_size=chats)
    try:
        latencies: list[float] = []
        started = time.perf_counter()
        await asyncio.gather(*(_chat(store, c, turns, latencies) for c in range(chats)))
        wall = time.perf_counter() - started
    finally:
        await store.aclose()
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "turns": len(latencies),
        "p50_ms": round(cuts[49] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "turns_per_s": round(len(latencies) / wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history_store", description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--turns", type=int, default=20, help="turns per chat")
    parser.add_argument("--label", default="history-store")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = asyncio.run(measure(str(Path(tmp) / "history.sqlite3"), args.chats, args.turns))
    cluster = PgCluster(durable=True).start()
    try:
        results["postgresql"] = asyncio.run(measure(cluster.url, args.chats, args.turns))
    finally:
        cluster.destroy()
    stem = RESULTS / f"{dt.date.today().isoformat()}-{args.label}"
    meta = {"chats": args.chats, "turns_per_chat": args.turns, "results": results}
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        f"# History-write latency, {args.chats} concurrent chats x {args.turns} turns (turn + usage row per write)",
        "",
        "| store | writes | p50 ms | p99 ms | turns/s |",
        "|---|---:|---:|---:|---:|",
        *(f"| {k} | {v['turns']} | {v['p50_ms']} | {v['p99_ms']} | {v['turns_per_s']} |" for k, v in results.items()),
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log.info("%s", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
