"""PostgreSQL store faults against a real cluster: unreachable at start, lost mid-run and back, password redaction."""

from __future__ import annotations

import time

import pytest

from agent.devtools.pg_cluster import PgCluster
from agent.serving.api.store import StoreUnavailableError, open_store
from agent.serving.api.store.postgres import StoreStartupError, redact
from tests.serving.live import free_port

pytestmark = pytest.mark.slow


def test_redact_hides_only_the_password() -> None:
    assert redact("postgresql://app:s3cret@db:5432/newbie") == "postgresql://app:***@db:5432/newbie"
    assert redact("postgresql://app@db/newbie") == "postgresql://app@db/newbie"


async def test_unreachable_at_start_retries_then_fails_naming_the_url() -> None:
    url = f"postgresql://app:s3cret@127.0.0.1:{free_port()}/newbie"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StoreStartupError) as failed:
        await open_store(url, connect_timeout=1.5)
    assert time.monotonic() - started >= 1.5  # it retried for the whole timeout
    message = str(failed.value)
    assert "postgresql://app:***@127.0.0.1" in message and "s3cret" not in message
    assert "attempts" in message and "STORE_CONNECT_TIMEOUT" in message


async def test_lost_mid_run_answers_503_then_recovers(pg_cluster: PgCluster, pg_url: str) -> None:
    store = await open_store(pg_url)
    await store.create("s", owner="alice")
    await store.append_turn("s", "q1", "a1")
    pg_cluster.stop("fast")
    try:
        with pytest.raises(StoreUnavailableError) as lost:
            await store.history("s")
        assert lost.value.status == 503 and lost.value.retry_after
        with pytest.raises(StoreUnavailableError):
            await store.ping()
    finally:
        pg_cluster.start()
    # back: the next calls reconnect by themselves (stale pooled connections are expired, not reused)
    deadline = time.monotonic() + 20
    while True:
        try:
            await store.ping()
            break
        except StoreUnavailableError:
            assert time.monotonic() < deadline, "the store did not recover"
    await store.append_turn("s", "q2", "a2")
    assert [t.content for t in await store.history("s")] == ["q1", "a1", "q2", "a2"]
    await store.aclose()
