"""Versioned schema migrations of both stores, applied in order at start (each once; the version is recorded).

Version 1 is the schema of the single-user SQLite store (sessions, turns); a file written by an older server has
those tables and no version table, and is brought forward from there (its sessions get the owner `local`).
Version 2 adds owners, daily usage, the tokens-per-minute window and concurrency leases.
Version 3 records which replica holds a lease and when it was taken (leases are renewed by their live replica).
Add a migration by appending to both lists with the next number; never edit one that has shipped.
"""

from __future__ import annotations

SQLITE: list[tuple[int, str]] = [
    (
        1,
        """
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
        """,
    ),
    (
        2,
        """
        ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT 'local';
        CREATE INDEX sessions_by_owner ON sessions(owner, updated_at);
        CREATE TABLE usage_daily (
            principal TEXT NOT NULL,
            day TEXT NOT NULL,
            role TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (principal, day)
        );
        CREATE TABLE token_window (
            principal TEXT NOT NULL,
            minute INTEGER NOT NULL,
            tokens INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (principal, minute)
        );
        CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            principal TEXT NOT NULL,
            expires_at REAL NOT NULL
        );
        CREATE INDEX leases_by_principal ON leases(principal, expires_at);
        """,
    ),
    (
        3,
        """
        ALTER TABLE leases ADD COLUMN holder TEXT NOT NULL DEFAULT '';
        ALTER TABLE leases ADD COLUMN acquired_at REAL NOT NULL DEFAULT 0;
        CREATE INDEX leases_by_holder ON leases(holder);
        """,
    ),
]

POSTGRES: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE IF NOT EXISTS sessions (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE IF NOT EXISTS turns (
            id BIGSERIAL PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            has_image BOOLEAN NOT NULL DEFAULT FALSE,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX IF NOT EXISTS turns_by_session ON turns(session_id, id);
        """,
    ),
    (
        2,
        """
        ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT 'local';
        CREATE INDEX sessions_by_owner ON sessions(owner, updated_at);
        CREATE TABLE usage_daily (
            principal TEXT NOT NULL,
            day TEXT NOT NULL,
            role TEXT NOT NULL,
            requests BIGINT NOT NULL DEFAULT 0,
            prompt_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (principal, day)
        );
        CREATE TABLE token_window (
            principal TEXT NOT NULL,
            minute BIGINT NOT NULL,
            tokens BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (principal, minute)
        );
        CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            principal TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX leases_by_principal ON leases(principal, expires_at);
        """,
    ),
    (
        3,
        """
        ALTER TABLE leases ADD COLUMN holder TEXT NOT NULL DEFAULT '';
        ALTER TABLE leases ADD COLUMN acquired_at DOUBLE PRECISION NOT NULL DEFAULT 0;
        CREATE INDEX leases_by_holder ON leases(holder);
        """,
    ),
]

LATEST = SQLITE[-1][0]
