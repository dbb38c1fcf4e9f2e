"""The python-backend model behind Triton's `qwen3-vl`: a thin lifecycle shell over the shared engine.

Shaped like NVIDIA's vllm_backend: `initialize` builds the engine (the same `load_engine(settings)` as FastAPI) on
its own event-loop thread; `execute` only decodes tensors and schedules every request of the batch on that loop, then
returns (decoupled model); responses go out from the loop thread through each request's response sender; a cancelled
request aborts its engine request; `finalize` drains in-flight requests before shutting the engine down.

`pb_utils` (triton_python_backend_utils) only exists inside the stub, so it is passed in by model.py.

Settings, highest precedence first (docs/versioning.md): the version folder's `engine.json` (what that version pins),
then the model's config.pbtxt `parameters`, then the environment (the same env as FastAPI). In both files only
non-empty values named like settings (MODEL_PATH, LOADING_STRATEGY, ...) count; an empty one defers to the next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import LoadingStrategy, Settings, SettingsError, load_settings
from agent.engine.base import Engine
from agent.engine.errors import EngineError, EngineFailure, InvalidRequestError, ModelLoadError, NotReadyError
from agent.engine.types import new_request_id
from agent.serving.triton import protocol as proto
from agent.serving.triton.repository import read_version_file
from agent.serving.triton.metrics import ModelMetrics

log = logging.getLogger(__name__)

CANCEL_CHECK_INTERVAL = 0.2  # s; checking on every token cost ~10 % throughput at 1 concurrent (measured)
DRAIN_TIMEOUT = 30.0  # s finalize waits for in-flight requests before aborting them
STATS_INTERVAL = 0.5  # s between copies of the engine's own running/waiting counts into metrics
PROMPT_LOG_ENV = "NEWBIE_TRITON_PROMPT_LOG"  # debug: append each decoded request's rendered prompt (JSONL) here


def settings_from_parameters(parameters: Mapping[str, Any], pinned: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, overridden by the model config's non-empty parameters named like settings,
    overridden in turn by the version's non-empty `pinned` values (its engine.json)."""
    overrides: dict[str, str] = {}
    layers = [{k: v.get("string_value", "") if isinstance(v, dict) else str(v) for k, v in parameters.items()}]
    for layer in [*layers, dict(pinned or {})]:
        for key, raw in layer.items():
            if raw.strip() and key.lower() in Settings.model_fields:
                overrides[key.lower()] = raw.strip()
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:  # SystemExit would take the stub down with no message for Triton's load API
        raise ModelLoadError(str(exc)) from None
    if settings.loading_strategy == LoadingStrategy.triton:
        raise ModelLoadError(
            "LOADING_STRATEGY=triton is the FastAPI gateway mode; inside Triton choose the engine "
            "(auto, transformers, vllm, onnx) via the model parameter LOADING_STRATEGY or the environment"
        )
    return settings


class TritonBackend:
    """Everything model.py's TritonPythonModel does, with `pb_utils` injected."""

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils
        self.engine: Engine | None = None
        self.limits = proto.RequestLimits()
        self.metrics: ModelMetrics | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._running = 0  # touched only on the loop thread
        self._prompt_log = os.environ.get(PROMPT_LOG_ENV) or None
        self._renderer: Any = None
        self._stats_task: Any = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_folder = Path(args["model_repository"]) / args["model_version"]
        settings = settings_from_parameters(config.get("parameters", {}), read_version_file(version_folder))
        self.limits = proto.RequestLimits.from_settings(settings)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.metrics = ModelMetrics.create(self.pb, labels)
        self._thread.start()
        from agent.serving.model_loader import load_engine

        started = time.monotonic()
        self.engine = asyncio.run_coroutine_threadsafe(load_engine(settings), self.loop).result()
        info = self.engine.info()
        # The model folder (whose numbered subfolders are the versions) lets the gateway add versions beside it.
        self.metrics.publish_info(self.pb, labels, info, extra={"repository": args["model_repository"]})
        self._stats_task = asyncio.run_coroutine_threadsafe(self._publish_engine_stats(), self.loop)
        log.info("engine %s ready on %s in %.1f s", info.engine, info.model_name, time.monotonic() - started)
        if self._prompt_log:
            self._renderer = _load_renderer(info.model_path)

    def execute(self, requests: list[Any]) -> None:
        """Decode every request of the batch and hand each to the engine; responses are sent from the loop thread."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                decoded = self._decode(request)
            except EngineError as exc:
                self._send_error(sender, exc)
                continue
            except Exception as exc:  # a bug in decoding: 500, logged, never disguised as a 4xx
                log.exception("decoding request failed")
                self._send_error(sender, EngineFailure(f"{type(exc).__name__}: {exc}"))
                continue
            future = asyncio.run_coroutine_threadsafe(self._serve(decoded, sender), self.loop)
            with self._lock:
                self._inflight[decoded.request.request_id] = future
            future.add_done_callback(lambda _f, rid=decoded.request.request_id: self._forget(rid))
        return None

    def finalize(self) -> None:
        """Let in-flight requests finish (up to DRAIN_TIMEOUT), abort the rest, shut the engine down."""
        self._accepting = False
        if self.metrics is not None and self.metrics.info is not None:
            self.metrics.info.set(0)  # a replacing instance publishes its own info; readers take the one at 1
        log.info("finalize: draining %d in-flight request(s)", len(self._inflight))
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.1)
        log.info("finalize: %d request(s) left after draining", len(self._inflight))
        if self.engine is not None:
            for rid in list(self._inflight):
                asyncio.run_coroutine_threadsafe(self.engine.abort(rid), self.loop).result(5)
            if self._stats_task is not None:
                self._stats_task.cancel()
            try:
                asyncio.run_coroutine_threadsafe(self.engine.shutdown(), self.loop).result(60)
            except Exception:
                log.exception("engine shutdown failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    # ----------------------------------------------------------------------------------------------- requests
    def _decode(self, request: Any) -> proto.DecodedRequest:
        if not self._accepting:
            raise NotReadyError("model is unloading", retry_after=1.0)
        pb = self.pb

        def get(name: str) -> Any:
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        array = get(proto.TEXT_INPUT) if get(proto.MESSAGES) is None else get(proto.MESSAGES)
        if array is not None and array.shape and array.shape[0] > 1:
            raise InvalidRequestError("one conversation per request (batch dimension must be 1)")
        # Client ids need not be unique (two clients may both send "1"); the engine's must be.
        client_id = request.request_id()
        engine_id = f"{client_id}-{new_request_id()[:12]}" if client_id else new_request_id()
        return proto.decode_request(get, self.limits, engine_id)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._inflight.pop(request_id, None)

    def _send_error(self, sender: Any, exc: EngineError) -> None:
        if exc.status >= 500:
            log.error("request failed: %s", proto.error_message(exc))
        error = self.pb.TritonError(proto.error_message(exc), code=self._triton_code(exc.status))
        try:
            sender.send(self.pb.InferenceResponse(output_tensors=[], error=error), flags=self._final)
        except Exception:  # the client is gone (stream closed): nothing left to tell it
            log.warning("could not send the error response: %s", proto.error_message(exc), exc_info=True)

    def _triton_code(self, status: int) -> Any:
        """Triton's error code for an HTTP status (it picks the HTTP status of the response from it)."""
        codes = self.pb.TritonError
        if status in (429, 503):
            return codes.UNAVAILABLE
        if status == 404:
            return codes.NOT_FOUND
        return codes.INVALID_ARG if status < 500 else codes.INTERNAL

    @property
    def _final(self) -> int:
        return self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def _response(self, text: str, chunk: Any) -> Any:
        tensors = [self.pb.Tensor(name, value) for name, value in proto.chunk_outputs(text, chunk).items()]
        return self.pb.InferenceResponse(output_tensors=tensors)

    async def _serve(self, decoded: proto.DecodedRequest, sender: Any) -> None:
        assert self.engine is not None and self.metrics is not None
        request, m = decoded.request, self.metrics
        started = last = time.monotonic()
        next_cancel_check = started + CANCEL_CHECK_INTERVAL
        parts: list[str] = []
        self._running += 1
        stream = self.engine.generate(request)
        try:
            m.running.set(self._running)
            self._log_prompt(request)
            async for chunk in stream:
                now = time.monotonic()
                if chunk.completion_tokens and not parts:
                    m.ttft.observe(now - started)
                elif chunk.text:
                    m.itl.observe(now - last)
                last = now
                parts.append(chunk.text)
                if now >= next_cancel_check:
                    next_cancel_check = now + CANCEL_CHECK_INTERVAL
                    if sender.is_cancelled():
                        await self.engine.abort(request.request_id)
                        m.aborted.increment(1)
                        sender.send(flags=self._final)
                        return
                if chunk.finished:
                    m.tokens.increment(chunk.completion_tokens)
                    text = chunk.text if decoded.stream else "".join(parts)
                    sender.send(self._response(text, chunk), flags=self._final)
                    return
                if decoded.stream and chunk.text:
                    sender.send(self._response(chunk.text, chunk))
            raise EngineFailure("engine stream ended without a final chunk")
        except EngineError as exc:
            self._send_error(sender, exc)
        except Exception as exc:
            log.exception("request %s failed", request.request_id)
            self._send_error(sender, EngineFailure(f"{type(exc).__name__}: {exc}"))
        finally:
            self._running -= 1
            await stream.aclose()  # type: ignore[attr-defined]
            m.running.set(self._running)

    async def _publish_engine_stats(self) -> None:
        """The engine's own running/waiting counts (so a cancelled request is seen leaving the engine itself)."""
        assert self.engine is not None and self.metrics is not None
        while True:
            stats = self.engine.stats
            self.metrics.engine_running.set(stats.running)
            self.metrics.engine_waiting.set(stats.waiting)
            await asyncio.sleep(STATS_INTERVAL)

    def _log_prompt(self, request: Any) -> None:
        """Debug aid (off unless NEWBIE_TRITON_PROMPT_LOG is set): record the prompt this request renders to."""
        if not self._prompt_log or self._renderer is None or self.engine is None:
            return
        from agent.engine.prompt import render_prompt

        try:
            prompt = render_prompt(self._renderer, request.messages, vision=self.engine.info().supports_images)
            with open(self._prompt_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"request_id": request.request_id, "prompt": prompt}) + "\n")
        except Exception:  # a debug aid must never fail a request
            log.warning("prompt log: cannot render request %s", request.request_id, exc_info=True)


def _load_renderer(model_path: str) -> Any:
    """The tokenizer (or processor) whose chat template renders prompts, for the prompt log only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception:
        log.exception("prompt log disabled: cannot load a tokenizer from %s", model_path)
        return None
