"""Per-principal limits and usage accounting, kept in the store so that every FastAPI replica sees the same counts.

- Concurrent requests (PRINCIPAL_MAX_CONCURRENT, or the key's `max_concurrent`): a lease in the store per request
  generating; the (N+1)th gets 429 with Retry-After. A request that ends (answered, failed, or cancelled because its
  client's connection died) releases its lease at once. A lease lives PRINCIPAL_LEASE_TTL_SECONDS and the replica
  holding it renews it every third of that while the request runs, so a replica killed mid-request (kill -9, OOM, a
  lost node) frees its slots within that TTL, not PRINCIPAL_LEASE_SECONDS; PRINCIPAL_LEASE_SECONDS stays the longest one
  request may hold a slot (renewal stops after it, so a stuck request on a live replica frees it too).
- Tokens per minute (PRINCIPAL_TOKENS_PER_MINUTE, or the key's `tokens_per_minute`): prompt + completion tokens
  counted per clock minute; a request is refused (429, Retry-After = seconds to the next minute) once the minute's
  tokens reached the limit. A request under the limit runs whole, so a minute can end a little over it.
- Usage: every finished generation adds one request and its tokens to the principal's row of the UTC day
  (`GET /usage`) and to per-role Prometheus counters. Usage is written after the answer; if the database is down
  then, the answer still goes out and the failure is logged and counted (`dsa_usage_write_failures`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

import anyio
from prometheus_client import CollectorRegistry, Counter

from agent.config import Settings
from agent.engine.errors import EngineError
from agent.serving.api.principals import Principal
from agent.serving.api.store import Store, StoreUnavailableError, UsageRecord

log = logging.getLogger(__name__)

CONCURRENCY_RETRY_AFTER = 1.0


class RateLimitedError(EngineError):
    """A principal is over one of its limits: 429 with Retry-After."""

    status, code = 429, "rate_limited"


class PrincipalMetrics:
    """Per-role counters (roles, not names: the label values stay few)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.requests = Counter(
            "dsa_principal_requests", "Finished generations by the caller's role", ["role"], registry=r
        )
        self.tokens = Counter(
            "dsa_principal_tokens", "Tokens by the caller's role and kind (prompt, completion)", ["role", "kind"],
            registry=r,
        )  # fmt: skip
        self.limited = Counter(
            "dsa_principal_limited", "Requests refused by a per-principal limit", ["role", "limit"], registry=r
        )
        self.usage_failures = Counter(
            "dsa_usage_write_failures", "Usage records lost because the store was unavailable", registry=r
        )


class PrincipalLimits:
    """Admission against the principal's limits and usage recording, both through the shared store."""

    def __init__(
        self, store: Store, settings: Settings, metrics: PrincipalMetrics, *, lease_ttl: float | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        # This replica's leases, by one id per process (host and pid say which one in the table; the suffix keeps
        # a restarted process with a reused pid from renewing its predecessor's leases).
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        ttl = settings.principal_lease_ttl_seconds if lease_ttl is None else lease_ttl
        self.lease_ttl = min(ttl, settings.principal_lease_seconds)
        self._held = 0
        self._heartbeat: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set while no lease is held
        self._idle.set()

    def limits_of(self, principal: Principal) -> tuple[int, int]:
        """(max concurrent, tokens per minute) of `principal`; 0 = off."""
        concurrent = principal.max_concurrent
        tpm = principal.tokens_per_minute
        return (
            self.settings.principal_max_concurrent if concurrent is None else concurrent,
            self.settings.principal_tokens_per_minute if tpm is None else tpm,
        )

    @contextlib.asynccontextmanager
    async def admit(self, principal: Principal) -> AsyncIterator[None]:
        """Hold one of the principal's request slots (429 when over a limit)."""
        concurrent, tpm = self.limits_of(principal)
        if tpm:
            now = time.time()
            used = await self.store.tokens_this_minute(principal.name, at=now)
            if used >= tpm:
                self.metrics.limited.labels(role=principal.role, limit="tokens_per_minute").inc()
                raise RateLimitedError(
                    f"{principal.name!r} used {used} tokens this minute, the limit is {tpm} "
                    "(PRINCIPAL_TOKENS_PER_MINUTE)",
                    retry_after=max(1.0, 60 - now % 60),
                )
        lease = None
        if concurrent:
            lease = await self.store.acquire_lease(principal.name, concurrent, self.lease_ttl, holder=self.holder)
            if lease is None:
                self.metrics.limited.labels(role=principal.role, limit="concurrent").inc()
                raise RateLimitedError(
                    f"{principal.name!r} already has {concurrent} requests generating (PRINCIPAL_MAX_CONCURRENT)",
                    retry_after=CONCURRENCY_RETRY_AFTER,
                )
            self._held += 1
            self._idle.clear()
            self._keep_renewing()
        try:
            yield
        finally:
            if lease is not None:
                self._held -= 1
                if not self._held:
                    self._idle.set()
                # Shielded: a cancelled request (client gone) still gives its slot back.
                with anyio.CancelScope(shield=True):
                    try:
                        await self.store.release_lease(lease)
                    except StoreUnavailableError:
                        log.warning(
                            "lease %s of %s not released (store unavailable): it expires", lease, principal.name
                        )

    def _keep_renewing(self) -> None:
        """Run the heartbeat while this replica holds leases (it ends by itself once none is held)."""
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        while self._held > 0:
            with contextlib.suppress(TimeoutError):  # woken early when the last lease is released: end now
                await asyncio.wait_for(self._idle.wait(), self.lease_ttl / 3)
            if self._held <= 0:
                return
            try:
                await self.store.renew_leases(
                    self.holder, self.lease_ttl, max_hold=self.settings.principal_lease_seconds
                )
            except StoreUnavailableError:  # the leases may lapse meanwhile: the limit is loose, never stuck
                log.warning("leases of %s not renewed (store unavailable); retrying", self.holder)
            except Exception:  # the heartbeat must outlive one bad round: the requests still need their slots
                log.exception("lease renewal of %s failed; retrying", self.holder)

    async def aclose(self) -> None:
        """Stop the heartbeat (at shutdown; the requests' own releases free the slots)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat

    async def record(self, principal: Principal, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one finished generation (never raises for a store outage: the answer is already made)."""
        await self.store_usage(self.usage(principal, prompt_tokens, completion_tokens))

    def usage(self, principal: Principal, prompt_tokens: int, completion_tokens: int) -> UsageRecord:
        """Count one finished generation in the metrics; returns the row to write (with its turn, or alone)."""
        role = str(principal.role)
        self.metrics.requests.labels(role=role).inc()
        self.metrics.tokens.labels(role=role, kind="prompt").inc(prompt_tokens)
        self.metrics.tokens.labels(role=role, kind="completion").inc(completion_tokens)
        return UsageRecord(principal.name, role, prompt_tokens, completion_tokens)

    async def store_usage(self, usage: UsageRecord) -> None:
        """Write a usage row alone (never raises for a store outage: the answer is already made)."""
        try:
            with anyio.CancelScope(shield=True):
                await self.store.record_usage(usage.principal, usage.role, usage.prompt_tokens, usage.completion_tokens)
        except StoreUnavailableError:
            self.metrics.usage_failures.inc()
            log.warning("usage of %s not recorded: the store is unavailable", usage.principal)
