"""Cache-aware routing over several Triton servers: `TRITON_GRPC_URL=host-a:8002,host-b:8002` in gateway mode.

Each Triton keeps a prefix cache of the prompts it has seen (the ONNX engine's, vLLM's). A conversation's prompts
share their beginning (the system prompt and the first turns kept by MAX_HISTORY), so sending every request whose
prompt starts the same way to the same Triton turns those prefixes into cache hits instead of recomputing them on
another replica. The routing key is the prompt up to its first user message; a consistent-hash ring (64 virtual
points per server) maps it to a server, so adding or removing one server moves only the keys that server owned.

Falling over: a server that is unreachable (it refuses the stream, or answers UNAVAILABLE, before the first chunk) is
skipped for `RETRY_DOWN` seconds and the request goes to the next server on the ring; a request whose answer has
started is not replayed elsewhere (its client sees the error, as with one server). Servers that are not up at start
keep connecting in the background; start() returns once one is ready.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from agent.config import Settings, TritonRouting
from agent.engine.base import Engine, stream_ended_early
from agent.engine.errors import NotReadyError
from agent.engine.types import EngineInfo, EngineStats, GenerationChunk, GenerationRequest, TextPart
from agent.serving.triton.gateway import TritonGatewayEngine

log = logging.getLogger(__name__)

VIRTUAL_POINTS = 64
RETRY_DOWN = 5.0  # s an unreachable server is skipped before it is tried again


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing: `order(key)` is every node, starting at the key's owner and going round the ring."""

    def __init__(self, nodes: Sequence[str], virtual_points: int = VIRTUAL_POINTS) -> None:
        if not nodes:
            raise ValueError("a hash ring needs at least one node")
        self.nodes = list(dict.fromkeys(nodes))
        ring = sorted((_point(f"{node}#{i}"), node) for node in self.nodes for i in range(virtual_points))
        self._points = [p for p, _ in ring]
        self._owners = [n for _, n in ring]

    def order(self, key: str) -> list[str]:
        start = bisect.bisect(self._points, _point(key)) % len(self._points)
        seen: dict[str, None] = {}
        for i in range(len(self._owners)):
            seen.setdefault(self._owners[(start + i) % len(self._owners)])
            if len(seen) == len(self.nodes):
                break
        return list(seen)


def routing_key(request: GenerationRequest) -> str:
    """The prompt's messages up to its first user message (system prompt, first question): what every later turn's
    prompt, and so its cached prefix, starts with."""
    texts = []
    for message in request.messages:
        texts.append(message.role + ":" + "".join(p.text for p in message.parts if isinstance(p, TextPart)))
        if message.role == "user":
            break
    return "\n".join(texts)


def grpc_urls(value: str) -> list[str]:
    """TRITON_GRPC_URL as a list (comma-separated)."""
    return [u.strip() for u in value.split(",") if u.strip()]


def gateway_from_settings(settings: Settings) -> Engine:
    """The gateway engine LOADING_STRATEGY=triton runs: one Triton server, or a router over several."""
    if len(grpc_urls(settings.triton_grpc_url)) > 1:
        return RoutedGatewayEngine.from_settings(settings)
    return TritonGatewayEngine.from_settings(settings)


class RoutedGatewayEngine(Engine):
    """An Engine over several Triton gateways (see the module docstring)."""

    def __init__(
        self,
        replicas: Mapping[str, Engine],
        *,
        retry_down: float = RETRY_DOWN,
        policy: TritonRouting = TritonRouting.affinity,
    ) -> None:
        self.replicas = dict(replicas)
        self.ring = HashRing(list(self.replicas))
        self.policy = policy
        self._turn = itertools.count()  # round_robin's position
        self.retry_down = retry_down
        self._up: set[str] = set()
        self._down_until: dict[str, float] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._owner: dict[str, Engine] = {}  # request id -> the replica running it (for abort)
        self.served: Counter[str] = Counter()  # answers started per server (logs, tests)

    @classmethod
    def from_settings(cls, settings: Settings) -> RoutedGatewayEngine:
        """One `TritonGatewayEngine` per TRITON_GRPC_URL entry (metrics on each host's TRITON_METRICS_PORT)."""
        return cls(
            {url: TritonGatewayEngine.from_settings(settings, url) for url in grpc_urls(settings.triton_grpc_url)},
            policy=settings.triton_routing,
        )

    @property
    def stats(self) -> EngineStats:  # type: ignore[override]
        total = EngineStats()
        for name in self._up:
            total.running += self.replicas[name].stats.running
        return total

    # --- life cycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every replica; return once one is ready (the others keep connecting in the background)."""
        for name, replica in self.replicas.items():
            self._starting[name] = asyncio.create_task(self._start_one(name, replica))
        pending = set(self._starting.values())
        while pending and not self._up:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if not self._up:
            errors = [t.exception() for t in self._starting.values() if t.done() and t.exception()]
            raise errors[0] if errors else NotReadyError("no Triton server ready", retry_after=5.0)

    async def _start_one(self, name: str, replica: Engine) -> None:
        try:
            await replica.start()
        except Exception as exc:
            log.warning("Triton %s did not start: %s", name, exc)
            raise
        self._up.add(name)
        log.info("routing to Triton %s (%d of %d up)", name, len(self._up), len(self.replicas))

    async def shutdown(self) -> None:
        for task in self._starting.values():
            task.cancel()
        for task in self._starting.values():
            with contextlib.suppress(BaseException):
                await task
        for replica in self.replicas.values():
            await replica.shutdown()

    async def health(self) -> bool:
        for name in list(self._up):
            if await self.replicas[name].health():
                return True
        return False

    def info(self) -> EngineInfo:
        return self.replicas[self._first_up()].info()

    def _first_up(self) -> str:
        for name in self.replicas:
            if name in self._up:
                return name
        raise NotReadyError("no Triton server ready", retry_after=5.0)

    # --- requests -----------------------------------------------------------------------------------------------

    def candidates(self, request: GenerationRequest) -> list[str]:
        """The servers to try, in order: the key's owner first (round_robin: the next server); down ones last (tried
        only if all others fail)."""
        now = time.monotonic()
        if self.policy is TritonRouting.round_robin:
            names = list(self.replicas)
            start = next(self._turn) % len(names)
            ordered = [n for n in names[start:] + names[:start] if n in self._up]
        else:
            ordered = [n for n in self.ring.order(routing_key(request)) if n in self._up]
        return [n for n in ordered if self._down_until.get(n, 0.0) <= now] + [
            n for n in ordered if self._down_until.get(n, 0.0) > now
        ]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        error: Exception | None = None
        for name in self.candidates(request):
            replica = self.replicas[name]
            stream = replica.generate(request)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                raise stream_ended_early(request.request_id) from None
            except NotReadyError as exc:  # unreachable before the answer started: the next server takes it
                await stream.aclose()
                self._down_until[name] = time.monotonic() + self.retry_down
                log.warning("Triton %s unavailable (%s): request %s falls over", name, exc, request.request_id)
                error = exc
                continue
            self._down_until.pop(name, None)
            self.served[name] += 1
            self._owner[request.request_id] = replica
            try:
                yield first
                async for chunk in stream:
                    yield chunk
            finally:
                self._owner.pop(request.request_id, None)
                await stream.aclose()
            return
        raise error or NotReadyError("no Triton server ready", retry_after=5.0)

    async def abort(self, request_id: str) -> None:
        replica = self._owner.get(request_id)
        if replica is not None:
            await replica.abort(request_id)

    # --- model control: every server serves the same model ------------------------------------------------------

    async def load_model(self, changes: Mapping[str, Any]) -> EngineInfo | None:
        """The same `/load_model` on every server that is up (a failure on one raises, naming it)."""
        infos = []
        for name in sorted(self._up):
            infos.append(await self.replicas[name].load_model(changes))
        return infos[0] if infos else None

    async def model_versions(self) -> dict[str, Any] | None:
        return await self.replicas[self._first_up()].model_versions()
