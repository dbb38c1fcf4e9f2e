"""The history store's interface: sessions (each owned by a principal), their turns, usage and shared limits.

Two implementations share it: SQLite (one file, the default; `store.sqlite`) and PostgreSQL (`store.postgres`, for
several FastAPI replicas). Both apply the same versioned schema migrations at start and pass one contract test suite
(tests/serving/api/store/test_store_contract.py). A turn (a user message and its answer, and its usage when given)
is written in one transaction: it is there whole or not at all, and two writers to one session never interleave
their pairs.
"""

from __future__ import annotations

import abc
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from agent.engine.errors import EngineError
from agent.engine.types import Message

TITLE_CHARS = 80
LOCAL_OWNER = "local"  # the owner of sessions made without API keys, and of sessions from before owners existed
STORE_RETRY_AFTER = 2.0  # s: how soon a client may retry while the database is unreachable


class StoreUnavailableError(EngineError):
    """The database cannot be reached (lost mid-run): 503 with Retry-After; the store reconnects by itself."""

    status, code = 503, "store_unavailable"


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
    owner: str = LOCAL_OWNER


@dataclass(frozen=True)
class UsageRow:
    """One principal's usage on one UTC day."""

    principal: str
    role: str
    day: str  # YYYY-MM-DD (UTC)
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class UsageRecord:
    """One finished generation's usage, written with its turn (`append_turn(..., usage=)`) or alone."""

    principal: str
    role: str
    prompt_tokens: int
    completion_tokens: int
    at: float | None = None  # default: now


def new_session_id() -> str:
    return uuid.uuid4().hex


def utc_day(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if at is None else at))


def title_of(message: str) -> str:
    line = " ".join(message.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


class Store(abc.ABC):
    """Sessions, turns, usage and per-principal limit state. Every method may raise `StoreUnavailableError`."""

    #: "sqlite" or "postgresql" (shown by /health and the logs)
    kind: str = ""

    # --- sessions and turns ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def sessions(self, owner: str | None = None) -> list[SessionSummary]:
        """Sessions of `owner` (every session when None), most recently updated first."""

    @abc.abstractmethod
    async def create(self, session_id: str | None = None, *, owner: str = LOCAL_OWNER, exist_ok: bool = False) -> str:
        """Create a session (a new id when none is given) owned by `owner`; return its id.

        Raises `ValueError` if it exists and not `exist_ok` (with `exist_ok`, the existing one is kept as it is).
        """

    @abc.abstractmethod
    async def owner_of(self, session_id: str) -> str | None:
        """The session's owner, or None if it does not exist."""

    async def exists(self, session_id: str) -> bool:
        return await self.owner_of(session_id) is not None

    @abc.abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Delete a session and its turns; False if it did not exist."""

    @abc.abstractmethod
    async def clear(self, session_id: str) -> bool:
        """Delete a session's turns, keeping the session; False if it does not exist."""

    @abc.abstractmethod
    async def history(self, session_id: str, last_turns: int | None = None) -> list[StoredTurn]:
        """A session's messages, oldest first; only the last `last_turns` user+assistant pairs if given."""

    @abc.abstractmethod
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
        """Store a user message and its answer in one transaction (committed when this returns), with `usage`
        (as `record_usage` would write it) in the same transaction: the turn and its usage are there together or
        not at all.

        Raises `NotFoundError` if the session does not exist (e.g. deleted while the answer was generated); then
        nothing is written, usage included.
        """

    # --- usage accounting -----------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def record_usage(
        self, principal: str, role: str, prompt_tokens: int, completion_tokens: int, *, at: float | None = None
    ) -> None:
        """Add one request and its tokens to the principal's row of the day, and to its tokens-per-minute window."""

    @abc.abstractmethod
    async def usage(
        self, principal: str | None = None, since: str | None = None, until: str | None = None
    ) -> list[UsageRow]:
        """Usage rows (one principal's, or everyone's when None) for days in [since, until], newest day first."""

    @abc.abstractmethod
    async def tokens_this_minute(self, principal: str, *, at: float | None = None) -> int:
        """Tokens (prompt + completion) the principal used in the current UTC minute, across every replica."""

    # --- concurrency leases (per-principal limits shared by replicas) --------------------------------------------

    @abc.abstractmethod
    async def acquire_lease(self, principal: str, limit: int, ttl: float, *, holder: str = "") -> str | None:
        """Take one of the principal's `limit` concurrent-request slots for `ttl` seconds, for the replica `holder`.

        Returns the lease id, or None when all slots are taken. A lease expires `ttl` seconds after it was taken or
        last renewed (`renew_leases`): a replica that died stops renewing, so its slots come back within `ttl`.
        """

    @abc.abstractmethod
    async def renew_leases(self, holder: str, ttl: float, *, max_hold: float) -> int:
        """Push the expiry of `holder`'s leases to now + `ttl`, except those taken more than `max_hold` seconds ago
        (a request stuck that long lets its slot expire). Returns how many were renewed."""

    @abc.abstractmethod
    async def release_lease(self, lease_id: str) -> None:
        """Give a slot back (a no-op for an unknown or expired lease)."""

    # --- life cycle -----------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise `StoreUnavailableError` unless the database answers now."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The schema version applied (the last migration's number)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection."""
