"""History store: SQLite sessions and turns, durable across restarts, safe under concurrent appends."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from agent.engine.errors import NotFoundError
from agent.serving.api.history_store import HistoryStore
from agent.serving.api.store.migrations import LATEST


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "history.sqlite3"


async def test_creates_parent_dir_and_uses_wal(db: Path) -> None:
    store = HistoryStore(db)
    assert db.is_file()
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()


async def test_turns_sessions_clear_delete(db: Path) -> None:
    store = HistoryStore(db)
    sid = await store.create()
    assert await store.exists(sid)
    with pytest.raises(ValueError, match="already exists"):
        await store.create(sid)
    assert await store.create(sid, exist_ok=True) == sid

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
    last = await store.history(sid, last_turns=1)
    assert [t.content for t in last] == ["And a heap?", "A tree with an order property."]
    assert await store.history(sid, last_turns=0) == []

    other = await store.create("other")
    await store.append_turn(other, "x" * 200, "y")
    listed = await store.sessions()
    assert [s.session_id for s in listed] == ["other", sid]  # newest first
    assert listed[0].title.endswith("…") and len(listed[0].title) == 80
    assert listed[1].title == "What is a binary tree?" and listed[1].turns == 2

    assert await store.clear(sid)
    assert await store.history(sid) == [] and await store.exists(sid)
    assert not await store.clear("missing")
    assert await store.delete(other)
    assert not await store.delete(other)
    assert [s.session_id for s in await store.sessions()] == [sid]
    with pytest.raises(NotFoundError):
        await store.append_turn(other, "to a deleted session", "lost")
    store.close()


async def test_restart_keeps_history(db: Path) -> None:
    store = HistoryStore(db)
    await store.create("s1")
    await store.append_turn("s1", "question", "answer")
    store.close()

    reopened = HistoryStore(db)
    assert [t.content for t in await reopened.history("s1")] == ["question", "answer"]
    assert [s.session_id for s in await reopened.sessions()] == ["s1"]
    reopened.close()


async def test_concurrent_appends_to_one_session_keep_pairs(db: Path) -> None:
    store = HistoryStore(db)
    second = HistoryStore(db)  # a second connection, as a second server process would have
    await store.create("busy")
    n = 40
    await asyncio.gather(*(s.append_turn("busy", f"q{i}", f"a{i}") for i, s in enumerate([store, second] * (n // 2))))
    turns = await store.history("busy")
    assert len(turns) == 2 * n
    # Each user message is followed by its own answer: pairs never interleave.
    for user, answer in zip(turns[::2], turns[1::2], strict=True):
        assert user.role == "user" and answer.role == "assistant"
        assert answer.content == "a" + user.content[1:]
    assert {t.content for t in turns[::2]} == {f"q{i}" for i in range(n)}
    store.close()
    second.close()


async def test_a_file_from_before_migrations_is_brought_forward(db: Path) -> None:
    """A history file written by the single-user server (schema 1, no version table) keeps its sessions: they
    belong to the operator principal `local`, which is who calls without keys (and with API_KEYS)."""
    db.parent.mkdir(parents=True)
    old = sqlite3.connect(db)
    old.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL,"
        " updated_at REAL NOT NULL);"
        "CREATE TABLE turns (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL REFERENCES sessions(id)"
        " ON DELETE CASCADE, role TEXT NOT NULL, content TEXT NOT NULL, has_image INTEGER NOT NULL DEFAULT 0,"
        " created_at REAL NOT NULL);"
        "INSERT INTO sessions VALUES ('default', 'What is a heap?', 1.0, 2.0);"
        "INSERT INTO turns (session_id, role, content, created_at) VALUES ('default', 'user', 'What is a heap?', 1.0),"
        " ('default', 'assistant', 'A tree with an order property.', 2.0);"
    )
    old.commit()
    old.close()
    store = HistoryStore(db)
    assert await store.schema_version() == LATEST
    assert [(s.session_id, s.owner, s.turns) for s in await store.sessions("local")] == [("default", "local", 1)]
    assert [t.content for t in await store.history("default")] == ["What is a heap?", "A tree with an order property."]
    store.close()
