"""A deterministic engine for unit tests of the doors (never used to serve users).

It answers "echo: <last user text>" one word per step, counts images, honours max_new_tokens and abort, and can be
slowed down per step to test streaming, cancellation and backpressure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from agent.engine.base import Engine
from agent.engine.errors import NotReadyError, UnsupportedInputError
from agent.engine.types import EngineInfo, EngineStats, GenerationChunk, GenerationRequest


class FakeEngine(Engine):
    def __init__(self, *, supports_images: bool = False, step_delay: float = 0.0, model_name: str = "fake") -> None:
        self.supports_images = supports_images
        self.step_delay = step_delay
        self.model_name = model_name
        self.stats = EngineStats()
        self.started = False
        self.last_request: GenerationRequest | None = None
        self._aborted: set[str] = set()

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_name=self.model_name,
            engine="fake",
            supports_images=self.supports_images,
            context_length=2048,
            device="cpu",
            model_path="fake",
        )

    async def health(self) -> bool:
        return self.started

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self.started:
            raise NotReadyError("engine not started")
        if request.images and not self.supports_images:
            raise UnsupportedInputError("this model cannot see images")
        self.last_request = request
        user = [m for m in request.messages if m.role == "user"]
        words = ["echo:", *(user[-1].text_content.split() if user else [])]
        words += [f"[{len(request.images)} images]"] if request.images else []
        prompt_tokens = sum(len(m.text_content.split()) + 4 for m in request.messages)
        limit = request.sampling.max_new_tokens
        self.stats.running += 1
        try:
            for n, word in enumerate(words[:limit], start=1):
                if request.request_id in self._aborted:
                    yield GenerationChunk(request.request_id, "", prompt_tokens, n - 1, "abort")
                    return
                if self.step_delay:
                    await asyncio.sleep(self.step_delay)
                self.stats.record_step(self.stats.running)
                last = n == min(len(words), limit)
                reason = None if not last else ("stop" if len(words) <= limit else "length")
                yield GenerationChunk(request.request_id, word if n == 1 else " " + word, prompt_tokens, n, reason)
        finally:
            self.stats.running -= 1
            self._aborted.discard(request.request_id)
