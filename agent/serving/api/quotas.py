"""Per-principal limits and usage accounting, kept in the store so that every FastAPI replica sees the same counts.

- Concurrent requests (PRINCIPAL_MAX_CONCURRENT, or the key's `max_concurrent`): a lease in the store per request
  generating; the (N+1)th gets 429 with Retry-After. A replica killed mid-request frees its leases after
  PRINCIPAL_LEASE_SECONDS.
- Tokens per minute (PRINCIPAL_TOKENS_PER_MINUTE, or the key's `tokens_per_minute`): prompt + completion tokens
  counted per clock minute; a request is refused (429, Retry-After = seconds to the next minute) once the minute's
  tokens reached the limit. A request under the limit runs whole, so a minute can end a little over it.
- Usage: every finished generation adds one request and its tokens to the principal's row of the UTC day
  (`GET /usage`) and to per-role Prometheus counters. Usage is written after the answer; if the database is down
  then, the answer still goes out and the failure is logged and counted (`dsa_usage_write_failures`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import anyio
from prometheus_client import CollectorRegistry, Counter

from agent.config import Settings
from agent.engine.errors import EngineError
from agent.serving.api.principals import Principal
from agent.serving.api.store import Store, StoreUnavailableError

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

    def __init__(self, store: Store, settings: Settings, metrics: PrincipalMetrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics

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
            lease = await self.store.acquire_lease(principal.name, concurrent, self.settings.principal_lease_seconds)
            if lease is None:
                self.metrics.limited.labels(role=principal.role, limit="concurrent").inc()
                raise RateLimitedError(
                    f"{principal.name!r} already has {concurrent} requests generating (PRINCIPAL_MAX_CONCURRENT)",
                    retry_after=CONCURRENCY_RETRY_AFTER,
                )
        try:
            yield
        finally:
            if lease is not None:
                # Shielded: a cancelled request (client gone) still gives its slot back.
                with anyio.CancelScope(shield=True):
                    try:
                        await self.store.release_lease(lease)
                    except StoreUnavailableError:
                        log.warning(
                            "lease %s of %s not released (store unavailable): it expires", lease, principal.name
                        )

    async def record(self, principal: Principal, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one finished generation (never raises for a store outage: the answer is already made)."""
        role = str(principal.role)
        self.metrics.requests.labels(role=role).inc()
        self.metrics.tokens.labels(role=role, kind="prompt").inc(prompt_tokens)
        self.metrics.tokens.labels(role=role, kind="completion").inc(completion_tokens)
        try:
            with anyio.CancelScope(shield=True):
                await self.store.record_usage(principal.name, role, prompt_tokens, completion_tokens)
        except StoreUnavailableError:
            self.metrics.usage_failures.inc()
            log.warning("usage of %s not recorded: the store is unavailable", principal.name)
