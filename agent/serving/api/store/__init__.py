"""The history store: one interface (`Store`), SQLite and PostgreSQL; `open_store` picks one by HISTORY_DB."""

from __future__ import annotations

import asyncio

from agent.serving.api.store.base import (
    LOCAL_OWNER,
    SessionSummary,
    Store,
    StoredTurn,
    StoreUnavailableError,
    UsageRecord,
    UsageRow,
    new_session_id,
)

__all__ = [
    "LOCAL_OWNER",
    "SessionSummary",
    "Store",
    "StoreUnavailableError",
    "StoredTurn",
    "UsageRecord",
    "UsageRow",
    "is_postgres_url",
    "new_session_id",
    "open_store",
]


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


async def open_store(target: str, *, connect_timeout: float = 30.0, pool_size: int = 10) -> Store:
    """A `postgresql://` URL -> `PostgresStore` (retried for `connect_timeout` s); anything else -> a SQLite file."""
    if is_postgres_url(target):
        from agent.serving.api.store.postgres import PostgresStore

        return await PostgresStore.connect(target, timeout=connect_timeout, pool_size=pool_size)
    from agent.serving.api.store.sqlite import SqliteStore

    return await asyncio.to_thread(SqliteStore, target)
