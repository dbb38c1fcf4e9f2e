"""One contract for both stores, run against SQLite and a real PostgreSQL (tests/serving/conftest.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.engine.errors import NotFoundError
from agent.serving.api.store import Store, UsageRecord, open_store
from agent.serving.api.store.migrations import LATEST


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "history.sqlite3")
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def store(target: str) -> AsyncIterator[Store]:
    opened = await open_store(target)
    yield opened
    await opened.aclose()


async def test_migrations_are_applied_once(store: Store, target: str) -> None:
    assert await store.schema_version() == LATEST
    again = await open_store(target)  # a second replica starting on the same database
    assert await again.schema_version() == LATEST
    await again.aclose()


async def test_turns_sessions_clear_delete(store: Store) -> None:
    sid = await store.create(owner="alice")
    assert await store.exists(sid) and await store.owner_of(sid) == "alice"
    with pytest.raises(ValueError, match="already exists"):
        await store.create(sid, owner="alice")
    assert await store.create(sid, owner="bob", exist_ok=True) == sid
    assert await store.owner_of(sid) == "alice"  # exist_ok never takes a session over

    await store.append_turn(sid, "What is a binary tree?", "A tree with two children per node.", has_image=True)
    await store.append_turn(sid, "And a heap?", "A tree with an order property.")
    turns = await store.history(sid)
    assert [(t.role, t.content, t.has_image) for t in turns] == [
        ("user", "What is a binary tree?", True),
        ("assistant", "A tree with two children per node.", False),
        ("user", "And a heap?", False),
        ("assistant", "A tree with an order property.", False),
    ]
    assert turns[0].created_at <= turns[1].created_at
    assert [t.content for t in await store.history(sid, last_turns=1)] == [
        "And a heap?",
        "A tree with an order property.",
    ]
    assert await store.history(sid, last_turns=0) == []

    other = await store.create("other", owner="bob")
    await store.append_turn(other, "x" * 200, "y")
    everyone = await store.sessions()
    assert [s.session_id for s in everyone] == ["other", sid]  # newest first
    assert everyone[0].title.endswith("…") and len(everyone[0].title) == 80 and everyone[0].owner == "bob"
    assert everyone[1].title == "What is a binary tree?" and everyone[1].turns == 2
    assert [s.session_id for s in await store.sessions("alice")] == [sid]
    assert await store.sessions("nobody") == []

    assert await store.clear(sid)
    assert await store.history(sid) == [] and await store.exists(sid)
    assert not await store.clear("missing")
    assert await store.delete(other) and not await store.delete(other)
    assert await store.owner_of(other) is None
    with pytest.raises(NotFoundError):
        await store.append_turn(other, "to a deleted session", "lost")


async def test_concurrent_writers_never_interleave(store: Store, target: str) -> None:
    second = await open_store(target)  # a second connection, as a second replica would have
    await store.create("busy")
    n = 40
    writers = [store, second] * (n // 2)
    await asyncio.gather(*(s.append_turn("busy", f"q{i}", f"a{i}") for i, s in enumerate(writers)))
    turns = await store.history("busy")
    assert len(turns) == 2 * n
    for user, answer in zip(turns[::2], turns[1::2], strict=True):
        assert user.role == "user" and answer.role == "assistant"
        assert answer.content == "a" + user.content[1:]
    assert {t.content for t in turns[::2]} == {f"q{i}" for i in range(n)}
    await second.aclose()


async def test_usage_per_principal_and_day(store: Store) -> None:
    day1 = time.mktime((2026, 12, 1, 12, 0, 0, 0, 0, 0)) - time.timezone
    day2 = day1 + 86400
    await store.record_usage("alice", "learner", 10, 5, at=day1)
    await store.record_usage("alice", "learner", 7, 3, at=day1 + 60)
    await store.record_usage("alice", "learner", 1, 1, at=day2)
    await store.record_usage("root", "admin", 2, 2, at=day2)
    alice = await store.usage("alice")
    assert [(r.day, r.requests, r.prompt_tokens, r.completion_tokens) for r in alice] == [
        ("2026-12-02", 1, 1, 1),
        ("2026-12-01", 2, 17, 8),
    ]
    assert {(r.principal, r.role) for r in await store.usage(since="2026-12-02")} == {
        ("alice", "learner"),
        ("root", "admin"),
    }
    assert [r.day for r in await store.usage("alice", until="2026-12-01")] == ["2026-12-01"]
    now = time.time()
    await store.record_usage("alice", "learner", 30, 12, at=now)
    assert await store.tokens_this_minute("alice", at=now) == 42
    assert await store.tokens_this_minute("alice", at=now + 60) == 0
    assert await store.tokens_this_minute("bob", at=now) == 0


async def test_leases_cap_concurrency_and_expire(store: Store, target: str) -> None:
    other_replica = await open_store(target)
    got = await asyncio.gather(*(s.acquire_lease("alice", 3, 60) for s in [store, other_replica] * 5))
    assert sum(g is not None for g in got) == 3  # the cap holds across connections racing for the last slot
    assert await store.acquire_lease("bob", 3, 60) is not None  # per principal
    first = next(g for g in got if g is not None)
    await other_replica.release_lease(first)
    assert await store.acquire_lease("alice", 3, 60) is not None
    assert await store.acquire_lease("alice", 3, 60) is None
    # a lease of a replica that died (never released) expires
    assert await store.acquire_lease("carol", 1, 0.2) is not None
    assert await store.acquire_lease("carol", 1, 60) is None
    await asyncio.sleep(0.3)
    assert await store.acquire_lease("carol", 1, 60) is not None
    await other_replica.aclose()


async def _fail_usage_writes(target: str, on: bool) -> None:
    """A real database fault between the turn and its usage: a trigger that makes every usage write fail."""
    if target.startswith("postgresql://"):
        import asyncpg

        conn = await asyncpg.connect(target)
        try:
            if on:
                await conn.execute(
                    "CREATE FUNCTION fail_usage() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'injected'; END $$"
                    " LANGUAGE plpgsql;"
                    " CREATE TRIGGER fail_usage BEFORE INSERT ON usage_daily FOR EACH ROW EXECUTE FUNCTION fail_usage()"
                )
            else:
                await conn.execute("DROP TRIGGER fail_usage ON usage_daily; DROP FUNCTION fail_usage()")
        finally:
            await conn.close()
        return
    with sqlite3.connect(target, isolation_level=None) as conn:
        if on:
            conn.execute(
                "CREATE TRIGGER fail_usage BEFORE INSERT ON usage_daily BEGIN SELECT RAISE(ABORT, 'injected'); END"
            )
        else:
            conn.execute("DROP TRIGGER fail_usage")
    conn.close()


async def test_a_turn_and_its_usage_are_one_transaction(store: Store, target: str) -> None:
    sid = await store.create(owner="alice")
    usage = UsageRecord("alice", "learner", 12, 4)
    await store.append_turn(sid, "What is a heap?", "A tree with an order property.", usage=usage)
    assert len(await store.history(sid)) == 2
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in await store.usage("alice")] == [(1, 12, 4)]

    await _fail_usage_writes(target, on=True)
    with pytest.raises(Exception, match="injected"):
        await store.append_turn(sid, "And a stack?", "Last in, first out.", usage=usage)
    assert [t.content for t in await store.history(sid)] == ["What is a heap?", "A tree with an order property."]
    assert [r.requests for r in await store.usage("alice")] == [1]  # neither the turn nor its usage
    await _fail_usage_writes(target, on=False)

    await store.delete(sid)
    with pytest.raises(NotFoundError):  # the session went away: its usage is not written either
        await store.append_turn(sid, "Still there?", "No.", usage=usage)
    assert [r.requests for r in await store.usage("alice")] == [1]
    assert await store.tokens_this_minute("alice") == 16
