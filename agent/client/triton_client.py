"""Python clients for the Triton door: `TritonHttpClient` (:8001) and `TritonGrpcClient` (:8002).

    from agent.client.triton_client import TritonHttpClient

    client = TritonHttpClient("localhost:8001")
    if client.check_health():
        response, response_time = client.chat("What is a data structure?")

The model (`qwen3-vl`, decoupled) is stateless: the client keeps the conversation (bounded like MAX_HISTORY) and sends
it as the `messages` input, so follow-ups carry earlier turns. Both clients are safe to share across threads.
Errors are the tree in `agent.client.errors`. Run this file (`python agent/client/triton_client.py`) for a demo.

Transport: gRPC uses tritonclient's bidirectional stream (`start_stream` / `async_stream_infer`). Over HTTP, a
decoupled model answers only Triton's generate extension (`/infer` returns 501) and tritonclient has no API for it,
so `generate` / `generate_stream` go through httpx; health, readiness and metadata go through tritonclient.
"""

from __future__ import annotations

import sys

if not __package__:  # run as a script (the seed's `python agent/client/triton_client.py`): make `agent` importable
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[2])

import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from agent.client._triton_base import (
    CONTROL_TIMEOUT,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT,
    ModelMetadata,
    TensorSpec,
    _Request,
    _TritonClient,
)
from agent.client.conversation import Piece
from agent.client.errors import (
    DsaClientError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
    error_from_http_body,
    error_from_message,
    error_from_triton,
)
from agent.serving.triton import protocol as proto  # the tensor names: one contract with the model

__all__ = ["DEFAULT_MODEL", "ModelMetadata", "TensorSpec", "TritonGrpcClient", "TritonHttpClient"]

log = logging.getLogger(__name__)


class TritonHttpClient(_TritonClient):
    """Client for Triton's HTTP endpoint (default localhost:8001). Thread-safe; see the module docstring."""

    def __init__(self, url: str | None = None, **kw: Any) -> None:
        super().__init__(url or os.environ.get("TRITON_HTTP_URL") or "localhost:8001", **kw)
        self._control_timeout = min(self.timeout, CONTROL_TIMEOUT)
        timeout = httpx.Timeout(self.timeout, connect=self._control_timeout)
        self._http = httpx.Client(base_url=f"http://{self.url}", timeout=timeout)
        # tritonclient's HTTP client is not thread-safe: one per thread, all closed by close().
        self._local = threading.local()
        self._triton_clients: list[httpclient.InferenceServerClient] = []
        self._lock = threading.Lock()

    def _triton(self) -> httpclient.InferenceServerClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = httpclient.InferenceServerClient(
                self.url, connection_timeout=self._control_timeout, network_timeout=self._control_timeout
            )
            self._local.client = client
            with self._lock:
                self._triton_clients.append(client)
        return client

    def _call(self, method: str, *args: Any, **kw: Any) -> Any:
        try:
            return getattr(self._triton(), method)(*args, **kw)
        except InferenceServerException as exc:
            raise error_from_triton(exc) from exc
        except TimeoutError as exc:  # gevent's socket timeouts are TimeoutError subclasses
            raise RequestTimeoutError(f"no answer from {self.url} within {self._control_timeout}s") from exc
        except OSError as exc:
            self._local.client = None  # its connection is broken; the next call opens a fresh one
            raise ServerUnavailableError(f"cannot reach Triton at {self.url}: {exc}") from exc

    def _live_and_ready(self) -> bool:
        if not self._call("is_server_live"):
            return False
        return bool(self._call("is_model_ready", self.model_name, self.model_version))

    def model_metadata(self) -> ModelMetadata:
        return ModelMetadata.from_json(self._call("get_model_metadata", self.model_name, self.model_version))

    def _endpoint(self, stream: bool) -> str:
        version = f"/versions/{self.model_version}" if self.model_version else ""
        return f"/v2/models/{self.model_name}{version}/{'generate_stream' if stream else 'generate'}"

    def _body(self, request: _Request) -> dict[str, Any]:
        body: dict[str, Any] = {proto.TEXT_INPUT: request.text, proto.STREAM: request.stream, **request.sampling}
        if request.messages:
            body[proto.MESSAGES] = json.dumps(request.messages)
        if request.images:
            body[proto.IMAGE] = request.images
        return body

    def _pieces(self, request: _Request) -> Iterator[Piece]:
        url, body = self._endpoint(request.stream), self._body(request)
        try:
            # Leaving this block early (close / Ctrl-C) closes the connection, which cancels the request in Triton.
            with self._http.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    raise error_from_http_body(response.status_code, response.read())
                if not request.stream:
                    yield _piece_from_json(json.loads(response.read()))
                    return
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        yield _piece_from_json(json.loads(line[5:]))
        except httpx.TimeoutException as exc:
            raise RequestTimeoutError(f"no answer from {self.url} within {self.timeout}s") from exc
        except httpx.TransportError as exc:
            raise ServerUnavailableError(f"cannot reach Triton at {self.url}: {exc}") from exc
        except ValueError as exc:
            raise ServerError(f"unreadable response from {self.url}: {exc}") from exc

    def close(self) -> None:
        self._http.close()
        with self._lock:
            clients, self._triton_clients = self._triton_clients, []
        for client in clients:
            client.close()


def _piece_from_json(data: dict[str, Any]) -> Piece:
    if "error" in data:
        error = data["error"]
        raise error_from_message(error if isinstance(error, str) else json.dumps(error))
    return Piece(
        text=_scalar(data.get(proto.TEXT_OUTPUT, "")),
        prompt_tokens=int(_scalar(data.get(proto.PROMPT_TOKENS, 0)) or 0),
        completion_tokens=int(_scalar(data.get(proto.COMPLETION_TOKENS, 0)) or 0),
        finish_reason=_scalar(data.get(proto.FINISH_REASON, "")) or None,
    )


def _scalar(value: Any) -> Any:
    """The generate extension returns 1-element outputs either bare or as a list, depending on the shape."""
    while isinstance(value, list):
        value = value[0] if value else ""
    return value


class TritonGrpcClient(_TritonClient):
    """Client for Triton's gRPC endpoint (default localhost:8002). Thread-safe; see the module docstring.

    A tritonclient gRPC client holds one stream at a time, so each request borrows a client from a small pool.
    """

    def __init__(self, url: str | None = None, **kw: Any) -> None:
        super().__init__(url or os.environ.get("TRITON_GRPC_URL") or "localhost:8002", **kw)
        self._idle: queue.SimpleQueue[grpcclient.InferenceServerClient] = queue.SimpleQueue()
        self._batched: bool | None = None  # whether the model's tensors carry a batch dimension

    def _borrow(self) -> grpcclient.InferenceServerClient:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return grpcclient.InferenceServerClient(self.url)

    def _call(self, method: str, *args: Any, **kw: Any) -> Any:
        client = self._borrow()
        try:
            return getattr(client, method)(*args, client_timeout=min(self.timeout, CONTROL_TIMEOUT), **kw)
        except InferenceServerException as exc:
            raise error_from_triton(exc) from exc
        finally:
            self._idle.put(client)

    def _live_and_ready(self) -> bool:
        if not self._call("is_server_live"):
            return False
        return bool(self._call("is_model_ready", self.model_name, self.model_version))

    def model_metadata(self) -> ModelMetadata:
        data = self._call("get_model_metadata", self.model_name, self.model_version, as_json=True)
        return ModelMetadata.from_json(data)

    def _inputs(self, request: _Request) -> list[grpcclient.InferInput]:
        if self._batched is None:
            config = self._call("get_model_config", self.model_name, self.model_version, as_json=True)
            self._batched = int(config.get("config", config).get("max_batch_size", 0)) > 0
        tensors: list[tuple[str, np.ndarray]] = [
            (proto.TEXT_INPUT, np.array([request.text.encode()], dtype=np.object_)),
            (proto.STREAM, np.array([request.stream], dtype=np.bool_)),
        ]
        if request.messages:
            tensors.append((proto.MESSAGES, np.array([json.dumps(request.messages).encode()], dtype=np.object_)))
        if request.images:
            tensors.append((proto.IMAGE, np.array([i.encode() for i in request.images], dtype=np.object_)))
        dtypes = {
            proto.MAX_TOKENS: np.int32,
            proto.TEMPERATURE: np.float32,
            proto.TOP_P: np.float32,
            proto.SEED: np.int64,
        }
        tensors += [(k, np.array([v], dtype=dtypes[k])) for k, v in request.sampling.items()]
        inputs = []
        for name, array in tensors:
            array = array[np.newaxis, ...] if self._batched else array
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def _pieces(self, request: _Request) -> Iterator[Piece]:
        try:
            inputs = self._inputs(request)
        except InferenceServerException as exc:
            raise error_from_triton(exc) from exc
        responses: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
        client, finished = self._borrow(), False
        try:
            client.start_stream(callback=lambda result, error: responses.put((result, error)))
            client.async_stream_infer(
                self.model_name,
                inputs,
                model_version=self.model_version,
                request_id=request.request_id,
                enable_empty_final_response=True,
            )
            while not finished:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise RequestTimeoutError(f"no answer from {self.url} within {self.timeout}s") from None
                if error is not None:
                    finished = True  # the stream is over; nothing to cancel
                    raise error_from_triton(error)
                final = result.get_response().parameters.get("triton_final_response")
                finished = bool(final and final.bool_param)
                if result.as_numpy(proto.TEXT_OUTPUT) is not None:
                    yield _piece_from_result(result)
        except InferenceServerException as exc:
            raise error_from_triton(exc) from exc
        finally:
            # Not finished (closed early, Ctrl-C, timeout): cancel the request on the server.
            if not finished:
                log.debug("cancelling request %s", request.request_id)
            client.stop_stream(cancel_requests=not finished)
            self._idle.put(client)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def _first(result: Any, name: str) -> Any:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _piece_from_result(result: Any) -> Piece:
    return Piece(
        text=_first(result, proto.TEXT_OUTPUT) or "",
        prompt_tokens=int(_first(result, proto.PROMPT_TOKENS) or 0),
        completion_tokens=int(_first(result, proto.COMPLETION_TOKENS) or 0),
        finish_reason=_first(result, proto.FINISH_REASON) or None,
    )


def main(argv: list[str] | None = None) -> int:
    """The seed's demo: health, one question, the answer and its time."""
    import argparse

    parser = argparse.ArgumentParser(description="Ask the Triton door one question.")
    parser.add_argument("question", nargs="?", default="What is a data structure?")
    parser.add_argument("--url", default=None, help="host:port (default TRITON_HTTP_URL or localhost:8001)")
    parser.add_argument("--grpc", action="store_true", help="use gRPC (default url TRITON_GRPC_URL or localhost:8002)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = parser.parse_args(argv)
    cls = TritonGrpcClient if args.grpc else TritonHttpClient
    with cls(args.url, timeout=args.timeout) as client:
        if not client.check_health():
            sys.stderr.write(f"Triton at {client.url} is not ready (is it running? `dsa-agent triton`)\n")
            return 1
        sys.stdout.write(f"Triton at {client.url} is ready; model {client.model_name}\n")
        try:
            response, response_time = client.chat(args.question, max_new_tokens=args.max_new_tokens)
        except DsaClientError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
        # The seed's demo output (a command's user interface, not logging).
        sys.stdout.write(f"Q: {args.question}\nResponse: {response}\nTime: {response_time:.2f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
