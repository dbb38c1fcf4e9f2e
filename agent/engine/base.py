"""The engine interface: every engine (transformers, vLLM, ONNX Runtime GenAI, Triton gateway) implements it."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from typing import Any

from agent.engine.errors import EngineFailure
from agent.engine.types import EngineInfo, EngineStats, GenerationChunk, GenerationRequest, GenerationResult


def stream_ended_early(request_id: str) -> EngineFailure:
    """The error for an engine stream that ended without its final chunk (a bug in the engine or a lost link): 500."""
    return EngineFailure(f"request {request_id}: the engine stream ended without a final chunk")


def final_chunk(last: GenerationChunk | None, request_id: str) -> GenerationChunk:
    """`last`, the last chunk of a stream, checked: EngineFailure (500) if the stream ended without a final chunk or
    the engine reported it failed (finish_reason "error")."""
    if last is None or last.finish_reason is None:
        raise stream_ended_early(request_id)
    if last.finish_reason == "error":
        raise EngineFailure(f"request {request_id}: the engine failed while generating")
    return last


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

    async def load_model(self, changes: Mapping[str, Any]) -> EngineInfo | None:
        """`/load_model` done by the engine itself, with `changes` (settings by field name) applied.

        None (the default): this engine loads one model for life, so the caller builds a new engine with the changed
        settings and swaps it in. An engine whose model lives elsewhere (the Triton gateway adds a model version in
        Triton) loads it and returns what now serves; ModelLoadError (422) if it cannot, the old model still serving.
        """
        return None

    async def model_versions(self) -> dict[str, Any] | None:
        """The model's versions and the default one, for /health and /v1/models (docs/versioning.md); None (the
        default) for an engine without versions."""
        return None

    async def complete(self, request: GenerationRequest) -> GenerationResult:
        """Collect a whole stream (non-streaming callers)."""
        parts: list[str] = []
        last: GenerationChunk | None = None
        async for chunk in self.generate(request):
            parts.append(chunk.text)
            last = chunk
        last = final_chunk(last, request.request_id)
        return GenerationResult(
            request_id=request.request_id,
            text="".join(parts),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason,
        )
