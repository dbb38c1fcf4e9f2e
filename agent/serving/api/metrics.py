"""Prometheus metrics of the FastAPI door (`GET /metrics`); names are listed in docs/api.md.

Each app has its own registry (several apps in one process, e.g. tests, do not collide). Request counts and
durations come from an ASGI middleware; generation timings come from the engine runner (`GenerationObserver`).
The engine batch-size histogram is derived from `engine.stats` (`steps`, `batch_size_sum`): the runner reports the
stats after every chunk, so each new step is observed with its own batch size (or the mean, when several steps
passed between two looks).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.engine.types import EngineStats
from agent.serving.api.engine_runner import Admission

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The door's metrics in their own registry; also the runner's `GenerationObserver`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsa_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "dsa_request_seconds", "HTTP request duration (streams: until the last byte)", ["route"], registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.ttft = Histogram(
            "dsa_time_to_first_token_seconds", "Arrival to first generated token (queue included)", registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.itl = Histogram(
            "dsa_inter_token_latency_seconds", "Time between generated tokens", registry=r, buckets=_TOKEN_BUCKETS
        )
        self.generated = Counter("dsa_generated_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("dsa_prompt_tokens", "Prompt tokens processed", registry=r)
        self.prefix_cached = Counter(
            "dsa_prefix_cached_tokens", "Prompt tokens reused from the engine's prefix cache, not computed", registry=r
        )
        self.running = Gauge("dsa_running_requests", "Requests generating now", registry=r)
        self.waiting = Gauge("dsa_waiting_requests", "Requests waiting for a generation slot", registry=r)
        self.batch_size = Histogram(
            "dsa_engine_batch_size", "Sequences per engine forward step", registry=r, buckets=_BATCH_BUCKETS
        )
        self.queue_seconds = Histogram(
            "dsa_queue_seconds", "Time waiting for a generation slot", registry=r, buckets=_LATENCY_BUCKETS
        )
        self._seen_steps: dict[int, tuple[int, int, int]] = {}  # id(stats) -> (steps, batch_size_sum, cached) seen

    def bind(self, admission: Admission) -> None:
        """Read the running/waiting gauges from the runner's admission at scrape time."""
        self.running.set_function(lambda: admission.running)
        self.waiting.set_function(lambda: admission.waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- GenerationObserver ---------------------------------------------------------------------------------------

    def queued(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt.inc(prompt_tokens)
        self.generated.inc(completion_tokens)

    def engine_step(self, stats: EngineStats) -> None:
        key, steps, total, cached = id(stats), stats.steps, stats.batch_size_sum, stats.prefix_cached_tokens
        last = self._seen_steps.get(key)
        if last is None:  # first look at this engine: a baseline, not a step
            if len(self._seen_steps) > 8:  # engines come and go with /load_model
                self._seen_steps.clear()
            self._seen_steps[key] = (steps, total, cached)
            return
        new_steps, new_total = steps - last[0], total - last[1]
        if new_steps <= 0:
            return
        self._seen_steps[key] = (steps, total, cached)
        if cached > last[2]:
            self.prefix_cached.inc(cached - last[2])
        mean = max(new_total, 0) / new_steps
        for _ in range(min(new_steps, 10_000)):
            self.batch_size.observe(mean)


class MetricsMiddleware:
    """Counts requests by route template (not raw path: bounded label values) and status, and times them."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = _route_label(scope)
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_seconds.labels(route=route).observe(time.monotonic() - started)


def _route_label(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return "unmatched"
    return path or "/"


router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    collected: Metrics = request.app.state.metrics
    runner = request.app.state.service.runner
    stats = runner.current_stats()
    if stats is not None:
        collected.engine_step(stats)
    return Response(collected.render(), media_type=CONTENT_TYPE_LATEST)
