"""Per-principal concurrency leases on a real PostgreSQL: a live replica keeps its slot past the lease TTL (it renews
it), a replica killed with SIGKILL mid-request gives it back within the TTL, not PRINCIPAL_LEASE_SECONDS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import load_settings
from agent.serving.api.principals import Principal, Role
from agent.serving.api.quotas import PrincipalLimits, PrincipalMetrics, RateLimitedError
from agent.serving.api.store import open_store

ROOT = Path(__file__).resolve().parents[3]
TTL = 1.5  # s: short, so the test waits seconds; PRINCIPAL_LEASE_SECONDS stays long (600) to tell the two apart
ALICE = Principal("alice", Role.learner)

# A second replica in its own process: takes alice's only slot, says so, and holds it until it is killed.
HOLDER = f"""
import asyncio, sys
from agent.config import load_settings
from agent.serving.api.principals import Principal, Role
from agent.serving.api.quotas import PrincipalLimits, PrincipalMetrics
from agent.serving.api.store import open_store

async def main():
    store = await open_store(sys.argv[1])
    settings = load_settings(principal_max_concurrent=1, principal_lease_seconds=600)
    limits = PrincipalLimits(store, settings, PrincipalMetrics(), lease_ttl={TTL})
    async with limits.admit(Principal("alice", Role.learner)):
        print("held", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def _admitted(limits: PrincipalLimits) -> bool:
    try:
        async with limits.admit(ALICE):
            return True
    except RateLimitedError:
        return False


@pytest.mark.slow
async def test_a_killed_replica_frees_its_slot_within_the_lease_ttl(pg_url: str) -> None:
    store = await open_store(pg_url)
    settings = load_settings(principal_max_concurrent=1, principal_lease_seconds=600)
    limits = PrincipalLimits(store, settings, PrincipalMetrics(), lease_ttl=TTL)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, pg_url], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert await asyncio.to_thread(holder.stdout.readline) == "held\n"
        await asyncio.sleep(3 * TTL)  # three lease lifetimes: only the holder's renewals keep the slot taken
        assert not await _admitted(limits)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        killed = time.monotonic()
        while not await _admitted(limits):
            assert time.monotonic() - killed < TTL + 2.0, "the dead replica's lease outlived its TTL"
            await asyncio.sleep(0.1)
        # and the slot is a single one again: taken by us, refused to a second request
        async with limits.admit(ALICE):
            assert not await _admitted(limits)
        assert limits._heartbeat is None or await asyncio.wait_for(limits._heartbeat, 5) is None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        await limits.aclose()
        await store.aclose()


async def test_a_stuck_request_stops_being_renewed_after_principal_lease_seconds(tmp_path: Path) -> None:
    store = await open_store(str(tmp_path / "history.sqlite3"))
    try:
        young = await store.acquire_lease("alice", 2, 60, holder="replica-a")
        assert young is not None and await store.acquire_lease("alice", 2, 60, holder="replica-b") is not None
        assert await store.renew_leases("replica-a", 60, max_hold=600) == 1  # only its own
        assert await store.renew_leases("replica-a", 60, max_hold=0) == 0  # held longer than max_hold: not renewed
        assert await store.renew_leases("nobody", 60, max_hold=600) == 0
    finally:
        await store.aclose()


async def test_a_cancelled_request_gives_its_slot_back_at_once(tmp_path: Path) -> None:
    # A client whose connection dies has its request task cancelled: the lease goes back then, not at its expiry.
    store = await open_store(str(tmp_path / "history.sqlite3"))
    limits = PrincipalLimits(store, load_settings(principal_max_concurrent=1), PrincipalMetrics())
    entered = asyncio.Event()

    async def request() -> None:
        async with limits.admit(ALICE):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(request())
    try:
        await entered.wait()
        assert not await _admitted(limits)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await _admitted(limits)
    finally:
        task.cancel()
        await limits.aclose()
        await store.aclose()
