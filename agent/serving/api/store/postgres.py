"""The PostgreSQL store (HISTORY_DB = postgresql://...): shared by every FastAPI replica, through asyncpg's pool.

Faults: at start the database is retried with exponential backoff for STORE_CONNECT_TIMEOUT seconds, then start-up
fails naming the URL (password redacted). Lost mid-run, every call raises `StoreUnavailableError` (503 with
Retry-After) and the pool's connections are expired, so the first call after the database returns reconnects: the
store recovers by itself.

Atomic turns: `append_turn` locks the session's row (`SELECT ... FOR UPDATE`) and inserts both messages in one
transaction, so concurrent writers to one session (on any replica) queue behind each other and the pairs keep
their order. Concurrency leases take a per-principal advisory lock, so two replicas never both take the last slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from agent.engine.errors import NotFoundError
from agent.serving.api.store import migrations
from agent.serving.api.store.base import (
    LOCAL_OWNER,
    STORE_RETRY_AFTER,
    SessionSummary,
    Store,
    StoredTurn,
    StoreUnavailableError,
    UsageRecord,
    UsageRow,
    new_session_id,
    title_of,
    utc_day,
)

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x6E65_7762  # advisory lock id: one replica migrates at a time
# What a lost or restarting database raises: the connection's own errors, the server shutting down, timeouts.
_LOST = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InterfaceError,
)


class StoreStartupError(RuntimeError):
    """The database could not be reached at start within STORE_CONNECT_TIMEOUT."""


def redact(url: str) -> str:
    """`url` with its password replaced by `***` (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore(Store):
    """See the module docstring. Build it with `await PostgresStore.connect(url)`."""

    kind = "postgresql"

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self._pool = pool
        self.url = redact(url)

    @classmethod
    async def connect(
        cls, url: str, *, timeout: float = 30.0, pool_size: int = 10, command_timeout: float = 10.0
    ) -> PostgresStore:
        """Open the pool (retrying with backoff for `timeout` seconds) and apply the migrations."""
        deadline, delay, attempt = time.monotonic() + timeout, 0.25, 0
        while True:
            attempt += 1
            try:
                pool = await asyncpg.create_pool(
                    url, min_size=1, max_size=pool_size, timeout=5.0, command_timeout=command_timeout
                )
                break
            except (*_LOST, asyncpg.exceptions.CannotConnectNowError) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreStartupError(
                        f"cannot reach the history database {redact(url)} after {attempt} attempts in {timeout:.0f} s"
                        f" (STORE_CONNECT_TIMEOUT): {type(exc).__name__}: {exc}"
                    ) from None
                log.warning("history database %s not reachable (%s); retrying in %.1f s", redact(url), exc, delay)
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)
        store = cls(pool, url)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        log.info("history store: PostgreSQL %s (schema v%d)", store.url, await store.schema_version())
        return store

    # --- plumbing ---------------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; a lost database becomes `StoreUnavailableError` and expires the pool's connections."""
        try:
            async with self._pool.acquire(timeout=5.0) as conn:
                yield conn
        except _LOST as exc:
            await self._pool.expire_connections()
            log.warning("history database %s unavailable: %s: %s", self.url, type(exc).__name__, exc)
            raise StoreUnavailableError(
                f"the history database is unavailable ({type(exc).__name__}); retry shortly",
                retry_after=STORE_RETRY_AFTER,
            ) from exc

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            return await conn.fetch(query, *args)

    async def _execute(self, query: str, *args: Any) -> str:
        async with self._conn() as conn:
            return await conn.execute(query, *args)

    async def _migrate(self) -> None:
        async with self._conn() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                for version, script in migrations.POSTGRES:
                    async with conn.transaction():
                        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                        if current < version:
                            await conn.execute(script)
                            await conn.execute("DELETE FROM schema_version")
                            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                            log.info("history store: applied migration %d to %s", version, self.url)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    # --- sessions and turns -----------------------------------------------------------------------------------------

    async def sessions(self, owner: str | None = None) -> list[SessionSummary]:
        query = (
            "SELECT s.id, s.title, s.updated_at, s.owner,"
            " (SELECT COUNT(*) FROM turns t WHERE t.session_id = s.id AND t.role = 'user') AS n FROM sessions s"
        )
        args: tuple[Any, ...] = ()
        if owner is not None:
            query, args = query + " WHERE s.owner = $1", (owner,)
        rows = await self._fetch(query + " ORDER BY s.updated_at DESC, s.created_at DESC", *args)
        return [SessionSummary(session_id=r[0], title=r[1], updated_at=r[2], owner=r[3], turns=r[4]) for r in rows]

    async def create(self, session_id: str | None = None, *, owner: str = LOCAL_OWNER, exist_ok: bool = False) -> str:
        session_id, now = session_id or new_session_id(), time.time()
        status = await self._execute(
            "INSERT INTO sessions (id, title, created_at, updated_at, owner) VALUES ($1, '', $2, $2, $3)"
            " ON CONFLICT (id) DO NOTHING",
            session_id,
            now,
            owner,
        )
        if status.endswith(" 0") and not exist_ok:
            raise ValueError(f"session {session_id!r} already exists")
        return session_id

    async def owner_of(self, session_id: str) -> str | None:
        rows = await self._fetch("SELECT owner FROM sessions WHERE id = $1", session_id)
        return rows[0][0] if rows else None

    async def delete(self, session_id: str) -> bool:
        return (await self._execute("DELETE FROM sessions WHERE id = $1", session_id)) != "DELETE 0"

    async def clear(self, session_id: str) -> bool:
        async with self._conn() as conn, conn.transaction():
            if await conn.fetchrow("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", session_id) is None:
                return False
            await conn.execute("DELETE FROM turns WHERE session_id = $1", session_id)
            await conn.execute("UPDATE sessions SET updated_at = $1 WHERE id = $2", time.time(), session_id)
        return True

    async def history(self, session_id: str, last_turns: int | None = None) -> list[StoredTurn]:
        query = "SELECT role, content, has_image, created_at FROM turns WHERE session_id = $1 ORDER BY id DESC"
        args: tuple[Any, ...] = (session_id,)
        if last_turns is not None:
            query, args = query + " LIMIT $2", (*args, 2 * max(last_turns, 0))
        rows = await self._fetch(query, *args)
        return [StoredTurn(role=r[0], content=r[1], has_image=r[2], created_at=r[3]) for r in reversed(rows)]

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
        now = time.time()
        async with self._conn() as conn, conn.transaction():
            # The row lock queues other writers of this session until we commit: pairs never interleave.
            if await conn.fetchrow("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", session_id) is None:
                raise NotFoundError(f"session {session_id!r} not found (deleted?)")
            await conn.executemany(
                "INSERT INTO turns (session_id, role, content, has_image, created_at) VALUES ($1, $2, $3, $4, $5)",
                [
                    (session_id, "user", user, has_image, asked_at or now),
                    (session_id, "assistant", assistant, False, now),
                ],
            )
            await conn.execute(
                "UPDATE sessions SET updated_at = $1, title = CASE WHEN title = '' THEN $2 ELSE title END"
                " WHERE id = $3",
                now,
                title_of(user),
                session_id,
            )
            if usage is not None:
                await self._write_usage(conn, usage)

    # --- usage and limits -------------------------------------------------------------------------------------------

    async def record_usage(
        self, principal: str, role: str, prompt_tokens: int, completion_tokens: int, *, at: float | None = None
    ) -> None:
        async with self._conn() as conn, conn.transaction():
            await self._write_usage(conn, UsageRecord(principal, role, prompt_tokens, completion_tokens, at))

    @staticmethod
    async def _write_usage(conn: asyncpg.Connection, usage: UsageRecord) -> None:
        """The day's row and the minute's window, in the caller's transaction."""
        at = usage.at or time.time()
        minute = int(at // 60)
        await conn.execute(
            "INSERT INTO usage_daily AS u (principal, day, role, requests, prompt_tokens, completion_tokens)"
            " VALUES ($1, $2, $3, 1, $4, $5) ON CONFLICT (principal, day) DO UPDATE SET role = excluded.role,"
            " requests = u.requests + 1, prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,"
            " completion_tokens = u.completion_tokens + excluded.completion_tokens",
            usage.principal,
            utc_day(at),
            usage.role,
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        await conn.execute(
            "INSERT INTO token_window AS w (principal, minute, tokens) VALUES ($1, $2, $3)"
            " ON CONFLICT (principal, minute) DO UPDATE SET tokens = w.tokens + excluded.tokens",
            usage.principal,
            minute,
            usage.prompt_tokens + usage.completion_tokens,
        )
        await conn.execute("DELETE FROM token_window WHERE minute < $1", minute - 5)

    async def usage(
        self, principal: str | None = None, since: str | None = None, until: str | None = None
    ) -> list[UsageRow]:
        rows = await self._fetch(
            "SELECT principal, role, day, requests, prompt_tokens, completion_tokens FROM usage_daily"
            " WHERE ($1::text IS NULL OR principal = $1) AND ($2::text IS NULL OR day >= $2)"
            " AND ($3::text IS NULL OR day <= $3) ORDER BY day DESC, principal",
            principal,
            since,
            until,
        )
        return [UsageRow(*r) for r in rows]

    async def tokens_this_minute(self, principal: str, *, at: float | None = None) -> int:
        minute = int((at or time.time()) // 60)
        rows = await self._fetch(
            "SELECT tokens FROM token_window WHERE principal = $1 AND minute = $2", principal, minute
        )
        return int(rows[0][0]) if rows else 0

    async def acquire_lease(self, principal: str, limit: int, ttl: float, *, holder: str = "") -> str | None:
        now = time.time()
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", principal)
            await conn.execute("DELETE FROM leases WHERE principal = $1 AND expires_at < $2", principal, now)
            if await conn.fetchval("SELECT COUNT(*) FROM leases WHERE principal = $1", principal) >= limit:
                return None
            lease = new_session_id()
            await conn.execute(
                "INSERT INTO leases (id, principal, expires_at, holder, acquired_at) VALUES ($1, $2, $3, $4, $5)",
                lease,
                principal,
                now + ttl,
                holder,
                now,
            )
        return lease

    async def renew_leases(self, holder: str, ttl: float, *, max_hold: float) -> int:
        now = time.time()
        status = await self._execute(
            "UPDATE leases SET expires_at = $1 WHERE holder = $2 AND acquired_at >= $3",
            now + ttl,
            holder,
            now - max_hold,
        )
        return int(status.rsplit(" ", 1)[-1])

    async def release_lease(self, lease_id: str) -> None:
        await self._execute("DELETE FROM leases WHERE id = $1", lease_id)

    # --- life cycle -------------------------------------------------------------------------------------------------

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1", timeout=2.0)

    async def schema_version(self) -> int:
        rows = await self._fetch("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        return int(rows[0][0])

    async def aclose(self) -> None:
        with contextlib.suppress(*_LOST):
            await asyncio.wait_for(self._pool.close(), 10)
