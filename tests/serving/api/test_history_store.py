"""The SQLite history store under its old import name (`HistoryStore`): what is SQLite's own (the file, WAL,
restarts, older files). Sessions, turns, usage and concurrent writers are the store contract, run on SQLite and
PostgreSQL alike (tests/serving/api/store/test_store_contract.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

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


async def test_restart_keeps_history(db: Path) -> None:
    store = HistoryStore(db)
    await store.create("s1")
    await store.append_turn("s1", "question", "answer")
    store.close()

    reopened = HistoryStore(db)
    assert [t.content for t in await reopened.history("s1")] == ["question", "answer"]
    assert [s.session_id for s in await reopened.sessions()] == ["s1"]
    reopened.close()


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
