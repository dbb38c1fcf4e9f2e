"""Conversation history in SQLite: sessions and their turns, durable before a reply is acknowledged.

One connection guarded by a lock (SQLite serializes writers anyway); every public coroutine runs its statement in
a worker thread (`asyncio.to_thread`) so the event loop never waits on disk. WAL mode lets other processes (a second
server, `sqlite3` on the command line) read while we write; `synchronous=FULL` makes a commit survive power loss.

Only whether a user turn carried an image is stored (`has_image`), never its pixels: follow-up turns send the
earlier turns' text to the model, not their images.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from agent.engine.errors import NotFoundError
from agent.engine.types import Message

log = logging.getLogger(__name__)

T = TypeVar("T")
TITLE_CHARS = 80

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    has_image INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_session ON turns(session_id, id);
"""


@dataclass(frozen=True)
class StoredTurn:
    """One stored message of a conversation."""

    role: Literal["user", "assistant"]
    content: str
    has_image: bool
    created_at: float

    def to_message(self) -> Message:
        """The turn as an engine message (text only: stored turns have no pixels)."""
        return Message.text(self.role, self.content)


@dataclass(frozen=True)
class SessionSummary:
    """A session as listed by `GET /sessions`."""

    session_id: str
    title: str
    turns: int  # user + assistant pairs
    updated_at: float


def new_session_id() -> str:
    return uuid.uuid4().hex


class HistoryStore:
    """Sessions and turns in one SQLite file (created with its parent folder if missing)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # One connection shared by worker threads; the lock makes each use exclusive.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._conn.executescript(_SCHEMA)
        log.info("history store: %s", self.path)

    # --- public API (async) -------------------------------------------------------------------------------------

    async def sessions(self) -> list[SessionSummary]:
        """All sessions, most recently updated first."""
        return await self._run(self._sessions)

    async def create(self, session_id: str | None = None, *, exist_ok: bool = False) -> str:
        """Create a session (a new id when none is given) and return its id.

        Raises `ValueError` if it exists and not `exist_ok`.
        """
        return await self._run(self._create, session_id or new_session_id(), exist_ok)

    async def exists(self, session_id: str) -> bool:
        return await self._run(self._exists, session_id)

    async def delete(self, session_id: str) -> bool:
        """Delete a session and its turns; False if it did not exist."""
        return await self._run(self._delete, session_id)

    async def clear(self, session_id: str) -> bool:
        """Delete a session's turns, keeping the session; False if it does not exist."""
        return await self._run(self._clear, session_id)

    async def history(self, session_id: str, last_turns: int | None = None) -> list[StoredTurn]:
        """A session's messages, oldest first; only the last `last_turns` user+assistant pairs if given."""
        return await self._run(self._history, session_id, last_turns)

    async def append_turn(
        self, session_id: str, user: str, assistant: str, *, has_image: bool = False, asked_at: float | None = None
    ) -> None:
        """Store a user message and its answer in one transaction (committed when this returns).

        Raises `NotFoundError` if the session does not exist (e.g. deleted while the answer was generated).
        """
        await self._run(self._append_turn, session_id, user, assistant, has_image, asked_at)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- implementation (runs in worker threads) ----------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: object) -> T:
        with self._lock:
            return fn(*args)

    def _sessions(self) -> list[SessionSummary]:
        rows = self._conn.execute(
            "SELECT s.id, s.title, s.updated_at,"
            " (SELECT COUNT(*) FROM turns t WHERE t.session_id = s.id AND t.role = 'user')"
            " FROM sessions s ORDER BY s.updated_at DESC, s.rowid DESC"
        ).fetchall()
        return [SessionSummary(session_id=r[0], title=r[1], updated_at=r[2], turns=r[3]) for r in rows]

    def _create(self, session_id: str, exist_ok: bool) -> str:
        now = time.time()
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO sessions (id, title, created_at, updated_at) VALUES (?, '', ?, ?)",
            (session_id, now, now),
        )
        if cur.rowcount == 0 and not exist_ok:
            raise ValueError(f"session {session_id!r} already exists")
        return session_id

    def _exists(self, session_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None

    def _delete(self, session_id: str) -> bool:
        return self._conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0

    def _clear(self, session_id: str) -> bool:
        with self._conn:  # one transaction
            self._conn.execute("BEGIN IMMEDIATE")
            if not self._exists(session_id):
                return False
            self._conn.execute("DELETE FROM turns WHERE session_id = ?", (session_id,))
            self._conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (time.time(), session_id))
        return True

    def _history(self, session_id: str, last_turns: int | None) -> list[StoredTurn]:
        query = "SELECT role, content, has_image, created_at FROM turns WHERE session_id = ? ORDER BY id DESC"
        params: tuple[object, ...] = (session_id,)
        if last_turns is not None:
            # Turns are stored in user+assistant pairs, so 2n rows are the last n turns.
            query += " LIMIT ?"
            params += (2 * max(last_turns, 0),)
        rows = self._conn.execute(query, params).fetchall()
        return [StoredTurn(role=r[0], content=r[1], has_image=bool(r[2]), created_at=r[3]) for r in reversed(rows)]

    def _append_turn(self, session_id: str, user: str, assistant: str, has_image: bool, asked_at: float | None) -> None:
        now = time.time()
        try:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    "INSERT INTO turns (session_id, role, content, has_image, created_at) VALUES (?, ?, ?, ?, ?)",
                    [
                        (session_id, "user", user, int(has_image), asked_at or now),
                        (session_id, "assistant", assistant, 0, now),
                    ],
                )
                self._conn.execute(
                    "UPDATE sessions SET updated_at = ?,"
                    " title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
                    (now, _title(user), session_id),
                )
        except sqlite3.IntegrityError:
            raise NotFoundError(f"session {session_id!r} not found (deleted?)") from None


def _title(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"
