"""TritonGatewayEngine: the FastAPI door's engine in gateway mode (LOADING_STRATEGY=triton).

It is a Triton gRPC-streaming client: every `generate` opens one bidirectional stream to the `qwen3-vl` model, sends
one request (tensors from agent.serving.triton.protocol) and yields a chunk per response until the one carrying a
finish reason. `abort` cancels the stream; Triton marks the request cancelled and the model aborts its engine request.
So one model copy (inside Triton) serves both doors, and prompt building happens there, in the shared engine.

`load_model(changes)` is `/load_model` in gateway mode: it adds a version of the Triton model pinning `changes` and
activates it through Triton's repository API (explicit model control; agent.serving.triton.versions), or, where this
process cannot write Triton's model folder, `reload(changes)`s the serving configuration with new parameters. Either
way a failed load keeps the previous model serving and raises ModelLoadError with Triton's reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import grpc

from agent.config import LoadingStrategy, Settings
from agent.engine.base import Engine, stream_ended_early
from agent.engine.errors import EngineError, EngineFailure, ModelLoadError, NotReadyError
from agent.engine.types import EngineInfo, EngineStats, GenerationChunk, GenerationRequest
from agent.serving.triton import protocol as proto
from agent.serving.triton.metrics import fetch_metrics_text, parse_model_info
from agent.serving.triton.versions import TritonVersions, load_reason

if TYPE_CHECKING:  # imported lazily at run time: tritonclient loads grpc and its protobufs
    from tritonclient.grpc.aio import InferenceServerClient

log = logging.getLogger(__name__)

READY_TIMEOUT = 600.0  # s start() waits for Triton's model (vLLM inside Triton takes ~30-120 s on CPU)
RELOAD_TIMEOUT = 900.0  # s a repository-API load may take


class TritonGatewayEngine(Engine):
    """An Engine whose model runs in a Triton server, reached over gRPC streaming."""

    def __init__(
        self,
        grpc_url: str,
        *,
        model: str = "qwen3-vl",
        metrics_url: str | None = None,
        ready_timeout: float = READY_TIMEOUT,
        control_key: str | None = None,
    ) -> None:
        self.grpc_url = grpc_url
        self.model = model
        self.metrics_url = metrics_url
        self.ready_timeout = ready_timeout
        self.control_key = control_key  # sent as `api-key` to Triton's model-control API (API_KEYS)
        self.stats = EngineStats()
        self._client: InferenceServerClient | None = None
        self._calls: dict[str, Any] = {}  # request id -> its gRPC stream (cancel() aborts it)
        self._aborted: set[str] = set()
        self._batched = False  # the model's config has max_batch_size > 0: tensors then carry a batch dimension
        self._info: EngineInfo | None = None
        self.versions: TritonVersions | None = None  # the Triton model's version control, once started

    @classmethod
    def from_settings(cls, settings: Settings, grpc_url: str | None = None) -> TritonGatewayEngine:
        """One Triton server: `grpc_url` (default TRITON_GRPC_URL; several are routed by
        agent.serving.triton.routing.gateway_from_settings), TRITON_MODEL_NAME, metrics on that host's
        TRITON_METRICS_PORT (for info())."""
        from agent.serving.triton.launcher import control_key

        url = grpc_url or settings.triton_grpc_url
        host = url.rpartition(":")[0] or "127.0.0.1"
        return cls(
            url,
            model=settings.triton_model_name,
            metrics_url=f"http://{host}:{settings.triton_metrics_port}/metrics",
            control_key=control_key(settings),
        )

    # ------------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect and wait until Triton's model is ready (NotReadyError after `ready_timeout`)."""
        import tritonclient.grpc.aio as grpcclient

        self._client = grpcclient.InferenceServerClient(self.grpc_url)
        self.versions = TritonVersions(
            self._client, self.model, control_key=self.control_key, metrics_url=self.metrics_url
        )
        deadline = time.monotonic() + self.ready_timeout
        while not await self.health():
            if time.monotonic() > deadline:
                raise NotReadyError(f"Triton model {self.model!r} at {self.grpc_url} not ready", retry_after=5.0)
            await asyncio.sleep(0.5)
        self._info = await self._fetch_info()
        config = await self._client.get_model_config(self.model, as_json=True)
        self._batched = int(config.get("config", config).get("max_batch_size", 0)) > 0
        log.info("gateway to Triton %s model %s (%s)", self.grpc_url, self.model, self._info.model_name)

    async def shutdown(self) -> None:
        for call in list(self._calls.values()):
            call.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def health(self) -> bool:
        if self._client is None:
            return False
        try:
            return bool(await self._client.is_model_ready(self.model))
        except Exception:  # connection refused while Triton starts: not ready, not an error
            return False

    def info(self) -> EngineInfo:
        if self._info is None:
            # Triton's model did not publish its info (metrics unreachable): say only what the gateway knows.
            return EngineInfo(
                model_name=self.model,
                engine="triton",
                supports_images=True,  # Triton answers 400 unsupported_input if it cannot see images
                context_length=0,
                device="remote",
                model_path=f"triton://{self.grpc_url}/{self.model}",
            )
        return self._info

    async def _fetch_info(self, version: int | None = None) -> EngineInfo:
        """What Triton's model (one `version` of it if given) loaded, from its `dsa_triton_model_info` metric."""
        remote = None
        if self.metrics_url:
            try:
                text = await asyncio.to_thread(fetch_metrics_text, self.metrics_url)
                remote = parse_model_info(text, self.model, version)
            except OSError as exc:
                log.warning("cannot read Triton metrics at %s: %s", self.metrics_url, exc)
        if remote is None:
            return self.info()
        return EngineInfo(
            model_name=remote.model_name,
            engine=f"triton/{remote.engine}",
            supports_images=remote.supports_images,
            context_length=remote.context_length,
            device=remote.device,
            model_path=remote.model_path,
            dtype=remote.dtype,
            quantization=remote.quantization,
        )

    # ------------------------------------------------------------------------------------------------ requests
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._client is None:
            raise NotReadyError("gateway engine not started", retry_after=1.0)
        from tritonclient.grpc import InferInput

        inputs = []
        for name, array in proto.encode_request(request, stream=True, batched=self._batched).items():
            tensor = InferInput(name, list(array.shape), proto.INPUT_DATATYPES[name])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        done = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.model, "inputs": inputs, "request_id": request.request_id}
            await done.wait()  # keep the stream open until our answer is complete

        rid = request.request_id
        call = self._client.stream_infer(requests())
        self._calls[rid] = call
        self.stats.running += 1
        finished = aborted = False
        last = GenerationChunk(rid, "", 0, 0)
        try:
            async for result, error in call:
                if error is not None:
                    finished = True  # an error response is Triton's last response for this request
                    raise proto.error_from_message(str(error.message()))
                response = result.get_response()
                names = [output.name for output in response.outputs]
                fast = proto.chunk_from_raw(names, response.raw_output_contents, rid)
                last = fast if fast is not None else proto.outputs_chunk(result.as_numpy, rid)
                finished = last.finished
                yield last
                if finished:
                    return
        except asyncio.CancelledError:
            if rid not in self._aborted:
                raise
        except grpc.aio.AioRpcError as exc:
            if rid not in self._aborted:
                raise _rpc_error(exc) from None
        finally:
            done.set()
            aborted = rid in self._aborted
            self.stats.running -= 1
            self._calls.pop(rid, None)
            self._aborted.discard(rid)
            if not finished:
                call.cancel()  # the client went away: Triton cancels the request, the model aborts the engine's
        if aborted:
            yield GenerationChunk(rid, "", last.prompt_tokens, last.completion_tokens, "abort")
            return
        raise stream_ended_early(rid)

    async def abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            self._aborted.add(request_id)
            call.cancel()

    # ------------------------------------------------------------------------------------------------ model control
    async def load_model(self, changes: Mapping[str, Any]) -> EngineInfo | None:
        """`/load_model` in gateway mode: a new Triton version pinning `changes`, activated (the old one finishes its
        requests, then unloads); where Triton's model folder is not writable from here, `reload(changes)` instead.

        None when `changes` leave gateway mode (another LOADING_STRATEGY): the caller then loads that engine itself.
        A failed load raises ModelLoadError (422) with Triton's reason and leaves the serving version untouched.
        """
        if changes.get("loading_strategy") not in (None, LoadingStrategy.triton, LoadingStrategy.triton.value):
            return None
        model_changes = {k: v for k, v in changes.items() if k != "loading_strategy"}
        try:
            return await self._add_version(model_changes)
        except EngineError:
            raise
        except Exception as exc:  # Triton unreachable mid-load, a protocol error: still "could not load", with why
            log.warning("load through Triton failed", exc_info=True)
            raise ModelLoadError(f"{type(exc).__name__}: {exc}") from exc

    async def model_versions(self) -> dict[str, Any] | None:
        """The versions Triton has loaded and the default one (`{"model", "policy", "default_version", "versions":
        [...], "history"}`); None when Triton refuses the repository API (informative: it never fails a route)."""
        if self.versions is None:
            return None
        try:
            return asdict(await self.versions.status())
        except Exception as exc:
            log.warning("cannot read Triton's model versions: %s", exc)
            return None

    async def _add_version(self, changes: Mapping[str, Any]) -> EngineInfo:
        from agent.serving.triton.repository import VersionsUnavailable

        if self.versions is None:
            raise NotReadyError("gateway engine not started", retry_after=1.0)
        try:
            version, _ = await self.versions.add(changes)
        except VersionsUnavailable as exc:
            log.info("cannot add a version (%s): reloading the serving one with new parameters", exc.message)
            return await self.reload(changes)
        return await self.refresh_info(version)

    async def refresh_info(self, version: int | None = None) -> EngineInfo:
        """Re-read what Triton serves (the given version's info) for `info()`."""
        self._info = await self._fetch_info(version)
        return self._info

    async def reload(self, overrides: Mapping[str, Any]) -> EngineInfo:
        """Reload Triton's model with `overrides` (settings names, e.g. {"model_path": ...}) as config parameters.

        Triton loads the new version beside the old one and swaps only on success; on failure the old model keeps
        serving and this raises ModelLoadError with Triton's reason. Values of None clear a parameter (the
        environment's value applies again).
        """
        if self._client is None:
            raise NotReadyError("gateway engine not started", retry_after=1.0)
        from tritonclient.utils import InferenceServerException

        config = (await self._client.get_model_config(self.model, as_json=True))["config"]
        params = dict(config.get("parameters", {}))
        for key, value in overrides.items():
            name = key.upper()
            if key.lower() not in Settings.model_fields:
                raise ModelLoadError(f"{name}: not a setting (see `dsa-agent config`)")
            params[name] = {"string_value": "" if value is None else str(getattr(value, "value", value))}
        config["parameters"] = params
        log.info("reloading Triton model %s with %s", self.model, dict(overrides))
        try:
            # gRPC names the restricted-protocol header with this prefix (HTTP clients send plain `api-key`).
            headers = {"triton-grpc-protocol-api-key": self.control_key} if self.control_key else None
            await self._client.load_model(
                self.model, headers=headers, config=json.dumps(config), client_timeout=RELOAD_TIMEOUT
            )
        except InferenceServerException as exc:
            raise ModelLoadError(load_reason(str(exc.message()))) from None
        self._info = await self._fetch_info()
        return self._info


def _rpc_error(exc: grpc.aio.AioRpcError) -> EngineError:
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return NotReadyError(f"Triton unavailable: {exc.details()}", retry_after=2.0)
    return EngineFailure(f"Triton stream failed: {exc.code().name}: {exc.details()}")
