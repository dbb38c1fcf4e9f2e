"""A real PostgreSQL for the store tests: one throwaway cluster per test session, a fresh database per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from agent.devtools.pg_cluster import PgCluster

_databases = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """PostgreSQL on 127.0.0.1 (a free port, a temp folder), torn down at the end of the session."""
    try:
        cluster = PgCluster().start()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The URL of a new, empty database in the session's cluster."""
    if not pg_cluster.running():  # a fault test stopped it and failed before restarting it
        pg_cluster.start()
    return pg_cluster.create_database(f"test_{next(_databases)}")
