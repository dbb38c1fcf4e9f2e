"""Conversation history: kept for the imports of earlier code; the store lives in `agent.serving.api.store`.

`HistoryStore` is the SQLite store (HISTORY_DB = a file path); `open_store` also opens PostgreSQL.
"""

from __future__ import annotations

from agent.serving.api.store import SessionSummary, Store, StoredTurn, new_session_id, open_store
from agent.serving.api.store.base import TITLE_CHARS
from agent.serving.api.store.sqlite import SqliteStore as HistoryStore

__all__ = ["TITLE_CHARS", "HistoryStore", "SessionSummary", "Store", "StoredTurn", "new_session_id", "open_store"]
