"""The SQLite store (HISTORY_DB = a file path, the default): one file, one server process writing at a time.

One connection guarded by a lock (SQLite serializes writers anyway); every public coroutine runs its statement in
a worker thread (`asyncio.to_thread`) so the event loop never waits on disk. WAL mode lets other processes (a second
server, `sqlite3` on the command line) read while we write; `synchronous=FULL` makes a commit survive power loss.
Writes that read first (`BEGIN IMMEDIATE`) take the write lock up front, so two processes never interleave them.

Only whether a user turn carried an image is stored (`has_image`), never its pixels.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agent.engine.errors import NotFoundError
from agent.serving.api.store import migrations
from agent.serving.api.store.base import (
    LOCAL_OWNER,
    SessionSummary,
    Store,
    StoredTurn,
    UsageRecord,
    UsageRow,
    new_session_id,
    title_of,
    utc_day,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class SqliteStore(Store):
    """Sessions and turns in one SQLite file (created with its parent folder if missing)."""

    kind = "sqlite"

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
            self._migrate()
        log.info("history store: SQLite %s (schema v%d)", self.path, self._version())

    # --- sessions and turns -----------------------------------------------------------------------------------------

    async def sessions(self, owner: str | None = None) -> list[SessionSummary]:
        return await self._run(self._sessions, owner)

    async def create(self, session_id: str | None = None, *, owner: str = LOCAL_OWNER, exist_ok: bool = False) -> str:
        return await self._run(self._create, session_id or new_session_id(), owner, exist_ok)

    async def owner_of(self, session_id: str) -> str | None:
        return await self._run(self._owner_of, session_id)

    async def delete(self, session_id: str) -> bool:
        return await self._run(self._delete, session_id)

    async def clear(self, session_id: str) -> bool:
        return await self._run(self._clear, session_id)

    async def history(self, session_id: str, last_turns: int | None = None) -> list[StoredTurn]:
        return await self._run(self._history, session_id, last_turns)

    async def append_turn(
        self,
        session_id: str,
        user: str,
        assistant: str,
        *,
        has_image: bool = False,
        asked_at: float | None = None,
        usage: UsageRecord | None = None,
    ) -> None:
        await self._run(self._append_turn, session_id, user, assistant, has_image, asked_at, usage)

    # --- usage and limits -------------------------------------------------------------------------------------------

    async def record_usage(
        self, principal: str, role: str, prompt_tokens: int, completion_tokens: int, *, at: float | None = None
    ) -> None:
        await self._run(self._record_usage, UsageRecord(principal, role, prompt_tokens, completion_tokens, at))

    async def usage(
        self, principal: str | None = None, since: str | None = None, until: str | None = None
    ) -> list[UsageRow]:
        return await self._run(self._usage, principal, since, until)

    async def tokens_this_minute(self, principal: str, *, at: float | None = None) -> int:
        minute = int((at or time.time()) // 60)
        row = await self._sql_one(
            "SELECT tokens FROM token_window WHERE principal = ? AND minute = ?", principal, minute
        )
        return int(row[0]) if row is not None else 0

    async def acquire_lease(self, principal: str, limit: int, ttl: float, *, holder: str = "") -> str | None:
        return await self._run(self._acquire_lease, principal, limit, ttl, holder)

    async def renew_leases(self, holder: str, ttl: float, *, max_hold: float) -> int:
        now = time.time()
        sql = "UPDATE leases SET expires_at = ? WHERE holder = ? AND acquired_at >= ?"
        return await self._run(lambda: self._conn.execute(sql, (now + ttl, holder, now - max_hold)).rowcount)

    async def release_lease(self, lease_id: str) -> None:
        await self._run(lambda: self._conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,)))

    # --- life cycle -------------------------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._run(lambda: self._conn.execute("SELECT 1").fetchone())

    async def schema_version(self) -> int:
        return await self._run(self._version)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- implementation (runs in worker threads) --------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: object) -> T:
        with self._lock:
            return fn(*args)

    async def _sql_one(self, query: str, *params: object) -> tuple | None:
        return await self._run(lambda: self._conn.execute(query, params).fetchone())

    def _migrate(self) -> None:
        self._conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for version, script in migrations.SQLITE:
            self._conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
            try:
                if self._version() < version:
                    for statement in filter(str.strip, script.split(";")):
                        self._conn.execute(statement)
                    self._conn.execute("DELETE FROM schema_version")
                    self._conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                    log.info("history store: applied migration %d to %s", version, self.path)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _version(self) -> int:
        row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def _sessions(self, owner: str | None) -> list[SessionSummary]:
        query = (
            "SELECT s.id, s.title, s.updated_at, s.owner,"
            " (SELECT COUNT(*) FROM turns t WHERE t.session_id = s.id AND t.role = 'user') FROM sessions s"
        )
        params: tuple[object, ...] = ()
        if owner is not None:
            query, params = query + " WHERE s.owner = ?", (owner,)
        rows = self._conn.execute(query + " ORDER BY s.updated_at DESC, s.rowid DESC", params).fetchall()
        return [SessionSummary(session_id=r[0], title=r[1], updated_at=r[2], owner=r[3], turns=r[4]) for r in rows]

    def _create(self, session_id: str, owner: str, exist_ok: bool) -> str:
        now = time.time()
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO sessions (id, title, created_at, updated_at, owner) VALUES (?, '', ?, ?, ?)",
            (session_id, now, now, owner),
        )
        if cur.rowcount == 0 and not exist_ok:
            raise ValueError(f"session {session_id!r} already exists")
        return session_id

    def _owner_of(self, session_id: str) -> str | None:
        row = self._conn.execute("SELECT owner FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return None if row is None else row[0]

    def _delete(self, session_id: str) -> bool:
        return self._conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0

    def _clear(self, session_id: str) -> bool:
        with self._conn:  # one transaction
            self._conn.execute("BEGIN IMMEDIATE")
            if self._owner_of(session_id) is None:
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

    def _append_turn(
        self,
        session_id: str,
        user: str,
        assistant: str,
        has_image: bool,
        asked_at: float | None,
        usage: UsageRecord | None,
    ) -> None:
        now = time.time()
        with self._conn:  # one transaction: the pair, the session's update and the usage, or none of them
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO turns (session_id, role, content, has_image, created_at) VALUES (?, ?, ?, ?, ?)",
                    [
                        (session_id, "user", user, int(has_image), asked_at or now),
                        (session_id, "assistant", assistant, 0, now),
                    ],
                )
            except sqlite3.IntegrityError:  # the session's foreign key: it is gone
                raise NotFoundError(f"session {session_id!r} not found (deleted?)") from None
            self._conn.execute(
                "UPDATE sessions SET updated_at = ?, title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
                (now, title_of(user), session_id),
            )
            if usage is not None:
                self._write_usage(usage)

    def _record_usage(self, usage: UsageRecord) -> None:
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._write_usage(usage)

    def _write_usage(self, usage: UsageRecord) -> None:
        """The day's row and the minute's window, in the caller's transaction."""
        at = usage.at or time.time()
        minute = int(at // 60)
        self._conn.execute(
            "INSERT INTO usage_daily (principal, day, role, requests, prompt_tokens, completion_tokens)"
            " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (principal, day) DO UPDATE SET role = excluded.role,"
            " requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
            " completion_tokens = completion_tokens + excluded.completion_tokens",
            (usage.principal, utc_day(at), usage.role, usage.prompt_tokens, usage.completion_tokens),
        )
        self._conn.execute(
            "INSERT INTO token_window (principal, minute, tokens) VALUES (?, ?, ?)"
            " ON CONFLICT (principal, minute) DO UPDATE SET tokens = tokens + excluded.tokens",
            (usage.principal, minute, usage.prompt_tokens + usage.completion_tokens),
        )
        self._conn.execute("DELETE FROM token_window WHERE minute < ?", (minute - 5,))

    def _usage(self, principal: str | None, since: str | None, until: str | None) -> list[UsageRow]:
        where, params = ["1 = 1"], []
        for clause, value in (("principal = ?", principal), ("day >= ?", since), ("day <= ?", until)):
            if value is not None:
                where.append(clause)
                params.append(value)
        rows = self._conn.execute(
            "SELECT principal, role, day, requests, prompt_tokens, completion_tokens FROM usage_daily"
            f" WHERE {' AND '.join(where)} ORDER BY day DESC, principal",
            params,
        ).fetchall()
        return [UsageRow(*r) for r in rows]

    def _acquire_lease(self, principal: str, limit: int, ttl: float, holder: str) -> str | None:
        now = time.time()
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")  # count and insert under the write lock: no two take the last slot
            self._conn.execute("DELETE FROM leases WHERE expires_at < ?", (now,))
            held = self._conn.execute("SELECT COUNT(*) FROM leases WHERE principal = ?", (principal,)).fetchone()[0]
            if held >= limit:
                return None
            lease = new_session_id()
            self._conn.execute(
                "INSERT INTO leases (id, principal, expires_at, holder, acquired_at) VALUES (?, ?, ?, ?, ?)",
                (lease, principal, now + ttl, holder, now),
            )
        return lease
