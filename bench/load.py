"""Load generators: N concurrent streaming clients, each request generating exactly `tokens` tokens.

Two wire protocols: OpenAI-compatible SSE (`/v1/chat/completions`: our FastAPI door and `vllm serve`) and Triton
(gRPC streaming via tritonclient, HTTP `generate_stream` SSE). Each request records time to first token, the gaps
between tokens and its end-to-end time; a level's aggregate tok/s is all tokens over the level's wall time. The
client's own CPU time per level is recorded too (it shares the machine with the server it times).
What each request says comes from a workload (bench/workloads.py): request i sends `workload.messages(i)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field

import httpx

from bench.workloads import Workload, random_workload

log = logging.getLogger(__name__)
DEFAULT_WORKLOAD = random_workload()
# One connection per request, for every OpenAI-compatible target alike: llama-server closes kept-alive connections
# in a way that races with their reuse (sequential requests on one kept-alive httpx connection: 12 of 60 failed with
# "Server disconnected without sending a response", before the server saw them; 0 of 60 on fresh connections).
# A connection costs well under a millisecond on 127.0.0.1, against ~1 s per request.
FRESH_CONNECTIONS = httpx.Limits(max_connections=256, max_keepalive_connections=0)


@dataclass
class RequestSample:
    ttft: float
    e2e: float
    tokens: int
    gaps: list[float] = field(default_factory=list)


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    tokens: int
    tok_per_s: float
    req_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    e2e_p50_s: float
    client_cpu_s: float = 0.0  # CPU time the benchmark client itself used during the level (all threads)

    def as_dict(self) -> dict:
        return asdict(self)


class StreamTimer:
    """Times one streamed request: time to first token, gaps between tokens, end to end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.gaps: list[float] = []
        self.tokens = 0

    def token(self, at: float | None = None) -> None:
        now = time.perf_counter() if at is None else at
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now

    def sample(self) -> RequestSample:
        if self.first is None:
            raise RuntimeError("no content streamed")
        return RequestSample(
            ttft=self.first - self.start, e2e=time.perf_counter() - self.start, tokens=self.tokens, gaps=self.gaps
        )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(concurrency: int, samples: list[RequestSample], errors: int, wall: float) -> LevelResult:
    tokens = sum(s.tokens for s in samples)
    gaps = [g for s in samples for g in s.gaps]
    return LevelResult(
        concurrency=concurrency,
        requests=len(samples),
        errors=errors,
        wall_s=round(wall, 3),
        tokens=tokens,
        tok_per_s=round(tokens / wall, 2) if wall else 0.0,
        req_per_s=round(len(samples) / wall, 3) if wall else 0.0,
        ttft_p50_ms=round(1000 * _pct([s.ttft for s in samples], 0.5), 2),
        ttft_p95_ms=round(1000 * _pct([s.ttft for s in samples], 0.95), 2),
        itl_p50_ms=round(1000 * statistics.median(gaps), 2) if gaps else float("nan"),
        e2e_p50_s=round(_pct([s.e2e for s in samples], 0.5), 3),
    )


async def run_level(one: Callable[[int], Awaitable[RequestSample]], concurrency: int, requests: int) -> LevelResult:
    """`requests` calls of `one`, at most `concurrency` at a time."""
    samples: list[RequestSample] = []
    errors = 0
    counter = iter(range(requests))

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            try:
                samples.append(await one(i))
            except Exception as exc:  # a failed request is counted, the run goes on
                errors += 1
                if errors <= 3:  # what went wrong, without flooding the log
                    log.warning("request %d failed at concurrency %d: %r", i, concurrency, exc)

    started, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result = summarize(concurrency, samples, errors, time.perf_counter() - started)
    result.client_cpu_s = round(time.process_time() - cpu0, 3)
    return result


async def openai_events(client: httpx.AsyncClient, url: str, body: dict) -> AsyncIterator[dict]:
    """The events of one streamed `/v1/chat/completions` (its SSE `data:` lines, `[DONE]` left out)."""
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                yield json.loads(line[5:])


def delta_text(event: dict) -> str:
    """The content an OpenAI stream event adds (empty for role-only, usage-only and tool-call events)."""
    return "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices", []))


class OpenAIStream:
    """One streaming chat completion against an OpenAI-compatible server (our FastAPI door, `vllm serve`,
    `llama-server`)."""

    def __init__(self, base_url: str, model: str, tokens: int, workload: Workload = DEFAULT_WORKLOAD) -> None:
        self.client = httpx.AsyncClient(base_url=base_url, timeout=600, limits=FRESH_CONNECTIONS)
        self.model = model
        self.tokens = tokens
        self.workload = workload

    async def __call__(self, i: int) -> RequestSample:
        body = {
            "model": self.model,
            "messages": self.workload.messages(i),
            "max_tokens": self.tokens,
            "temperature": 0.0,
            "stream": True,
            "ignore_eos": True,  # vLLM's extension, also accepted by our door: every request makes exactly N tokens
            "stream_options": {"include_usage": True},
        }
        timer, events = StreamTimer(), 0
        async for event in openai_events(self.client, "/v1/chat/completions", body):
            if event.get("usage"):
                timer.tokens = event["usage"]["completion_tokens"]
            if delta_text(event):
                timer.token()
                events += 1
        timer.tokens = timer.tokens or events  # a server that sends no usage: one token per content event
        return timer.sample()

    async def close(self) -> None:
        await self.client.aclose()


class TritonHttpStream:
    """One request through Triton's HTTP `generate_stream` (SSE) on the decoupled model."""

    def __init__(self, url: str, model: str, tokens: int, workload: Workload = DEFAULT_WORKLOAD) -> None:
        self.client = httpx.AsyncClient(base_url=f"http://{url}", timeout=600, limits=httpx.Limits(max_connections=256))
        self.path = f"/v2/models/{model}/generate_stream"
        self.tokens = tokens
        self.workload = workload

    async def __call__(self, i: int) -> RequestSample:
        body = {
            "messages": json.dumps(self.workload.messages(i)),  # the model's `messages` input: OpenAI-shaped JSON
            "max_tokens": self.tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        timer = StreamTimer()
        async with self.client.stream("POST", self.path, json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                timer.tokens = int(event.get("completion_tokens", timer.tokens))
                if event.get("text_output"):
                    timer.token()
        return timer.sample()

    async def close(self) -> None:
        await self.client.aclose()


class TritonGrpcStream:
    """Requests through Triton's gRPC bidirectional stream, with the project's own async client (the gateway engine
    that FastAPI uses in gateway mode: tritonclient.grpc.aio, one stream per request)."""

    def __init__(self, url: str, model: str, tokens: int, workload: Workload = DEFAULT_WORKLOAD) -> None:
        from agent.serving.triton.gateway import TritonGatewayEngine

        self.gateway = TritonGatewayEngine(url, model=model)
        self.inner = InProcessEngine(self.gateway, tokens, workload)
        self.started = False

    async def __call__(self, i: int) -> RequestSample:
        if not self.started:
            await self.gateway.start()
            self.started = True
        return await self.inner(i)

    async def close(self) -> None:
        await self.gateway.shutdown()


class InProcessEngine:
    """Requests straight into an Engine object (no door): the in-process reference figures."""

    def __init__(self, engine: object, tokens: int, workload: Workload = DEFAULT_WORKLOAD) -> None:
        self.engine, self.tokens, self.workload = engine, tokens, workload

    async def __call__(self, i: int) -> RequestSample:
        from agent.engine.types import GenerationRequest, Message, SamplingParams

        request = GenerationRequest(
            messages=tuple(Message.text(m["role"], m["content"]) for m in self.workload.messages(i)),
            sampling=SamplingParams(max_new_tokens=self.tokens, temperature=0.0, ignore_eos=True),
        )
        timer = StreamTimer()
        async for chunk in self.engine.generate(request):
            timer.tokens = chunk.completion_tokens
            if chunk.text:
                timer.token()
        return timer.sample()

    async def close(self) -> None:
        return None
