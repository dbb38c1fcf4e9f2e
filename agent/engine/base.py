"""The engine interface: every engine (transformers, vLLM, ONNX Runtime GenAI, Triton gateway) implements it."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from agent.engine.types import EngineInfo, EngineStats, GenerationChunk, GenerationRequest, GenerationResult


class Engine(abc.ABC):
    """Async, streaming, batching text (+ image) generation over one loaded model.

    Lifecycle: construct (cheap) -> `await start()` (loads/warms the model) -> `generate` many times, concurrently ->
    `await shutdown()`. Concurrent `generate` calls share forward passes inside the engine.
    """

    stats: EngineStats

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; return once it can answer."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream chunks for one request; the last chunk has `finish_reason` set.

        Raises agent.engine.errors.EngineError subclasses for bad input (e.g. images on a text-only model).
        Closing the iterator early (client gone) aborts the request.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running or waiting request; its stream ends with finish_reason "abort"."""

    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """What is loaded."""

    async def health(self) -> bool:
        """True while the engine can answer."""
        return True

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Finish or abort in-flight work and free the model."""

    async def complete(self, request: GenerationRequest) -> GenerationResult:
        """Collect a whole stream (non-streaming callers)."""
        parts: list[str] = []
        last: GenerationChunk | None = None
        async for chunk in self.generate(request):
            parts.append(chunk.text)
            last = chunk
        assert last is not None and last.finish_reason is not None, "engine stream ended without a final chunk"
        return GenerationResult(
            request_id=request.request_id,
            text="".join(parts),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason,
        )
