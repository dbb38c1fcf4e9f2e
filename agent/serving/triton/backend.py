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
from agent.engine.base import Engine, stream_ended_early
from agent.engine.errors import EngineError, EngineFailure, InvalidRequestError, ModelLoadError, NotReadyError
from agent.engine.types import new_request_id
from agent.serving.triton import protocol as proto
from agent.serving.triton.admission import WATCH_INTERVAL, RequestGate, TrackedSender, instance_marker
from agent.serving.triton.metrics import ModelMetrics
from agent.serving.triton.repository import read_version_file

log = logging.getLogger(__name__)

CANCEL_CHECK_INTERVAL = 0.2  # s; checking on every token cost ~10 % throughput at 1 concurrent (measured)
ENGINE_SHUTDOWN_TIMEOUT = 30.0  # s finalize waits for the engine to stop (vLLM: 11-13 s on CPU, measured)
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
        # At most MAX_CONCURRENT_REQUESTS running + MAX_QUEUE waiting; drains at shutdown (triton/admission.py)
        self.gate = RequestGate()
        self._watch_task: Any = None
        self._accepting = True
        self._running = 0  # touched only on the loop thread
        self._prompt_log = os.environ.get(PROMPT_LOG_ENV) or None
        self._renderer: Any = None
        self._stats_task: Any = None
        self._drained_task: Any = None
        self._engine_stopping: asyncio.Future[None] | None = None  # the engine's shutdown, once started

    # ----------------------------------------------------------------------------------------------- lifecycle
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_folder = Path(args["model_repository"]) / args["model_version"]
        settings = settings_from_parameters(config.get("parameters", {}), read_version_file(version_folder))
        self.limits = proto.RequestLimits.from_settings(settings)
        self.gate = RequestGate(
            settings.max_concurrent_requests, settings.max_queue, settings.graceful_shutdown_seconds
        )
        self.gate.closer = self._close
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.metrics = ModelMetrics.create(self.pb, labels)
        self._thread.start()
        self._watch_task = asyncio.run_coroutine_threadsafe(self.gate.watch(), self.loop)
        from agent.serving.model_loader import load_engine

        started = time.monotonic()
        self.engine = asyncio.run_coroutine_threadsafe(load_engine(settings), self.loop).result()
        info = self.engine.info()
        # The model folder (whose numbered subfolders are the versions) lets the gateway add versions beside it.
        self.metrics.publish_info(self.pb, labels, info, extra={"repository": args["model_repository"]})
        self._stats_task = asyncio.run_coroutine_threadsafe(self._publish_engine_stats(), self.loop)
        if self.gate.drain_file is not None:
            instance_marker(self.gate.drain_file, "live").touch()
            self._drained_task = asyncio.run_coroutine_threadsafe(self._stop_when_drained(), self.loop)
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
            self._schedule(decoded, sender)
        return None

    def finalize(self) -> None:
        """Refuse new requests, let in-flight ones finish for up to GRACEFUL_SHUTDOWN_SECONDS, cancel the rest (each
        gets a final error response and its engine request is aborted), then shut the engine down."""
        self._accepting = False
        if self.gate.drain_file is not None:  # Triton is unloading this instance (the launcher waits for it)
            instance_marker(self.gate.drain_file, "live").unlink(missing_ok=True)
        if self.metrics is not None and self.metrics.info is not None:
            self.metrics.info.set(0)  # a replacing instance publishes its own info; readers take the one at 1
        self.gate.stop_accepting()
        log.info("finalize: draining %d in-flight request(s)", self.gate.inflight)
        left = self.gate.drain(self.gate.grace + 5.0)  # the watch cancels what is left at the grace deadline
        if left:
            log.warning("finalize: %d request(s) still open after the grace period", left)
        for task in (self._watch_task, self._stats_task, self._drained_task):
            if task is not None:
                task.cancel()
        try:
            asyncio.run_coroutine_threadsafe(self._stop_engine(), self.loop).result(ENGINE_SHUTDOWN_TIMEOUT + 1)
        except Exception:
            log.exception("engine shutdown failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if self.gate.drain_file is not None:
            instance_marker(self.gate.drain_file, "done").unlink(missing_ok=True)

    async def _stop_when_drained(self) -> None:
        """The server is stopping (the launcher's drain file) and every request has had its final response: stop
        the engine now, then say so (a `done` marker). Triton unloads the model, and so calls `finalize`, only once
        nothing holds it; tritonserver 2.51 can hold it after a cancelled gRPC stream (a race in its gRPC front
        end, fixed upstream in 25.04), and the launcher then ends the server without losing anything."""
        drain_file = self.gate.drain_file
        while drain_file is None or not (drain_file.exists() and self.gate.drained):
            await asyncio.sleep(WATCH_INTERVAL)
        await self._stop_engine()
        instance_marker(drain_file, "done").touch()
        log.info("drained: every request answered, engine stopped")

    async def _stop_engine(self) -> None:
        """Shut the engine down once, whoever asks first (the drain or `finalize`); later callers wait for it."""
        if self._engine_stopping is None:
            self._engine_stopping = asyncio.ensure_future(self._shutdown_engine())
        await asyncio.shield(self._engine_stopping)

    async def _shutdown_engine(self) -> None:
        if self.engine is None:
            return
        try:
            await asyncio.wait_for(self.engine.shutdown(), ENGINE_SHUTDOWN_TIMEOUT)
        except Exception:
            log.exception("engine shutdown failed")

    def _schedule(self, decoded: proto.DecodedRequest, sender: Any) -> None:
        """Admit the request (or refuse it at once: 429 when full, 503 while draining) and hand it to the loop."""
        request_id = decoded.request.request_id
        # Counted in flight until its final response is out, whichever path sends it (admission.py).
        tracked = TrackedSender(sender, self._final, on_final=lambda: self.gate.forget(request_id))
        refusal = self.gate.admit(request_id, tracked)
        if refusal is not None:
            self._send_error(tracked, refusal)
            return
        future = asyncio.run_coroutine_threadsafe(self._guarded(decoded, tracked), self.loop)
        self.gate.track(request_id, future)

    async def _guarded(self, decoded: proto.DecodedRequest, sender: TrackedSender) -> None:
        """Serve once a slot is free. Cancelled (client gone, or the grace period over while draining): the engine
        request is aborted by closing its stream, and the sender still gets its final response."""
        try:
            await self.gate.run(decoded.request.request_id, lambda: self._serve(decoded, sender))
        except asyncio.CancelledError:
            if not sender.finished:
                if sender.is_cancelled():
                    if self.metrics is not None:
                        self.metrics.aborted.increment(1)
                    try:
                        sender.send(flags=self._final)
                    except Exception:  # the stream is already gone: nothing left to close
                        log.debug("could not close cancelled request %s", decoded.request.request_id, exc_info=True)
                else:
                    message = f"server shutting down: not finished within GRACEFUL_SHUTDOWN_SECONDS={self.gate.grace:g}"
                    self._send_error(sender, NotReadyError(message, retry_after=1.0))
            raise

    def _close(self, sender: TrackedSender, why: str) -> None:
        """The final response of a request whose coroutine ended without one (the gate's closer)."""
        if sender.is_cancelled():
            sender.send(flags=self._final)
        else:
            self._send_error(sender, NotReadyError(f"request not completed: {why}", retry_after=1.0))

    # ----------------------------------------------------------------------------------------------- requests
    def _decode(self, request: Any) -> proto.DecodedRequest:
        if not self._accepting:
            raise NotReadyError("model is unloading", retry_after=1.0)
        self._started()  # 503 rather than a request that could never be served
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
        # Request parameters (vllm_backend reads sampling values there when no `sampling_parameters` tensor is sent;
        # HTTP `generate` puts its `parameters` object and unknown top-level keys there).
        return proto.decode_request(get, self.limits, engine_id, parameters=request.parameters() or None)

    def _started(self) -> tuple[Engine, ModelMetrics]:
        """The engine and metrics `initialize` made; NotReadyError (503) before it has."""
        if self.engine is None or self.metrics is None:
            raise NotReadyError("model is not initialized yet", retry_after=1.0)
        return self.engine, self.metrics

    def _send_error(self, sender: Any, exc: EngineError) -> None:
        if exc.status >= 500 and not isinstance(exc, NotReadyError):  # 503 (draining, loading) is no failure
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
        engine, m = self._started()
        request = decoded.request
        started = last = time.monotonic()
        next_cancel_check = started + CANCEL_CHECK_INTERVAL
        parts: list[str] = []
        # The gaps between tokens are observed after the answer is out: each metric call is a round trip to the
        # Triton server (35-80 us measured), which would otherwise sit between every two tokens.
        gaps: list[float] = []
        self._running += 1
        stream = engine.generate(request)
        try:
            m.running.set(self._running)
            self._log_prompt(request)
            async for chunk in stream:
                now = time.monotonic()
                if chunk.completion_tokens and not parts:
                    m.ttft.observe(now - started)
                elif chunk.text:
                    gaps.append(now - last)
                last = now
                parts.append(chunk.text)
                if now >= next_cancel_check:
                    next_cancel_check = now + CANCEL_CHECK_INTERVAL
                    if sender.is_cancelled():
                        await engine.abort(request.request_id)
                        m.aborted.increment(1)
                        sender.send(flags=self._final)
                        return
                if chunk.finished:
                    m.tokens.increment(chunk.completion_tokens)
                    text = chunk.text if decoded.stream else decoded.echo + "".join(parts)
                    sender.send(self._response(text, chunk), flags=self._final)
                    return
                if decoded.stream and chunk.text:
                    sender.send(self._response(chunk.text, chunk))
            raise stream_ended_early(request.request_id)
        except EngineError as exc:
            self._send_error(sender, exc)
        except Exception as exc:
            log.exception("request %s failed", request.request_id)
            self._send_error(sender, EngineFailure(f"{type(exc).__name__}: {exc}"))
        finally:
            self._running -= 1
            await stream.aclose()  # type: ignore[attr-defined]
            m.running.set(self._running)
            for gap in gaps:
                m.itl.observe(gap)

    async def _publish_engine_stats(self) -> None:
        """The engine's own running/waiting counts (so a cancelled request is seen leaving the engine itself) and its
        prefix-cache hits."""
        engine, metrics = self._started()
        cached = engine.stats.prefix_cached_tokens  # the engine's running total; the counter gets its increments
        while True:
            stats = engine.stats
            metrics.engine_running.set(stats.running)
            metrics.engine_waiting.set(stats.waiting)
            if stats.prefix_cached_tokens > cached:
                metrics.prefix_cached.increment(stats.prefix_cached_tokens - cached)
            cached = stats.prefix_cached_tokens
            await asyncio.sleep(STATS_INTERVAL)

    def _log_prompt(self, request: Any) -> None:
        """Debug aid (off unless NEWBIE_TRITON_PROMPT_LOG is set): record the prompt this request renders to."""
        if not self._prompt_log or self._renderer is None or self.engine is None:
            return
        from agent.engine.prompt import render_prompt

        try:
            prompt = render_prompt(
                self._renderer, request.messages, vision=self.engine.info().supports_images, tools=request.tools
            )
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
