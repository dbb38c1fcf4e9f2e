"""A client for the FastAPI door (:8000) with the same shape as the Triton clients.

    from agent.client.rest_client import RestClient

    with RestClient("localhost:8000") as client:
        answer, seconds = client.chat("What is a binary tree?")
        for delta in client.stream_chat("And a heap?"):
            ...

Unlike Triton, FastAPI keeps the conversation on the server, per `session_id` (None: the server's default session,
the seed's single-user API); `history` and `clear_history()` read and clear it there. Errors are the tree in
`agent.client.errors`; streaming reads the SSE stream of `POST /chat` with `stream: true` (docs/api.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import httpx

from agent.client.conversation import ChatResult, ChatStream, ImageInput, Piece, Turn, encode_image
from agent.client.errors import (
    DsaClientError,
    InvalidInputError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
    error_for_status,
    error_from_http_body,
)
from agent.engine.types import EngineInfo

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds per step: connecting, then the whole answer (chat) or each piece (streams)
CONTROL_TIMEOUT = 10.0  # seconds for connecting and for quick calls (health, history, sessions)


class RestClient:
    """Client for the FastAPI door. Thread-safe (one pooled httpx client); use as a context manager or `close()`."""

    def __init__(
        self,
        url: str = "http://localhost:8000",
        *,
        session_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url if url.startswith(("http://", "https://")) else f"http://{url}"
        self.session_id = session_id
        self.timeout = timeout
        self._control = httpx.Timeout(min(timeout, CONTROL_TIMEOUT))
        generation = httpx.Timeout(timeout, connect=min(timeout, CONTROL_TIMEOUT))
        self._http = httpx.Client(base_url=self.url, timeout=generation, transport=transport)

    # --- health and model -----------------------------------------------------------------------------------
    def check_health(self) -> bool:
        """True once the server answers `GET /health` with status ready; False if loading or unreachable."""
        try:
            return self._json("GET", "/health", timeout=self._control).get("status") == "ready"
        except DsaClientError as exc:
            log.info("health check of %s failed: %s", self.url, exc)
            return False

    def model_info(self) -> EngineInfo:
        """What the server has loaded (the `model` of `GET /health`)."""
        model = self._json("GET", "/health", timeout=self._control).get("model") or {}
        known = {f.name for f in fields(EngineInfo)}
        try:
            return EngineInfo(**{k: v for k, v in model.items() if k in known})
        except TypeError as exc:
            raise ServerError(f"unexpected /health model description: {model}") from exc

    # --- sessions and history -------------------------------------------------------------------------------
    def new_session(self) -> str:
        """Start a fresh server-side conversation and use it from now on; returns its id."""
        self.session_id = str(self._json("POST", "/sessions", timeout=self._control)["session_id"])
        return self.session_id

    @property
    def history(self) -> list[Turn]:
        """The session's conversation as the server keeps it, oldest first."""
        params = {"session_id": self.session_id} if self.session_id else None
        items = self._json("GET", "/history", params=params, timeout=self._control).get("history", [])
        return [Turn(i["role"], i["content"], bool(i.get("has_image"))) for i in items]

    def clear_history(self) -> None:
        """Forget the session's conversation on the server."""
        body = {"session_id": self.session_id} if self.session_id else {}
        self._json("POST", "/clear_history", json=body, timeout=self._control)

    # --- chat -----------------------------------------------------------------------------------------------
    def chat(self, message: str, image: ImageInput | None = None, **sampling: Any) -> tuple[str, float]:
        """Ask one question; returns (answer, seconds). Sampling: max_new_tokens, temperature, top_p, seed."""
        result = self.complete(message, image, **sampling)
        return result.text, result.seconds

    def complete(self, message: str, image: ImageInput | None = None, **sampling: Any) -> ChatResult:
        """Like `chat` but returns the whole `ChatResult` (text, seconds, token counts, finish reason)."""
        data = self._json("POST", "/chat", json=self._body(message, image, sampling, stream=False))
        usage = data.get("usage") or {}
        return ChatResult(
            text=data["response"],
            seconds=float(data.get("response_time", 0.0)),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=data.get("finish_reason") or "stop",
        )

    def stream_chat(self, message: str, image: ImageInput | None = None, **sampling: Any) -> ChatStream:
        """Ask one question and iterate the answer's text deltas; `close()` the stream to cancel the generation."""
        body = self._body(message, image, sampling, stream=True)
        return ChatStream(self._sse(body))

    def _body(self, message: str, image: ImageInput | None, sampling: dict[str, Any], *, stream: bool) -> dict:
        if not isinstance(message, str) or not message.strip():
            raise InvalidInputError("message: expected a non-empty string")
        allowed = {"max_new_tokens", "temperature", "top_p", "seed"}
        if unknown := set(sampling) - allowed:
            raise TypeError(f"unexpected sampling arguments: {sorted(unknown)} (allowed: {sorted(allowed)})")
        body: dict[str, Any] = {
            "message": message,
            "image_base64": encode_image(image) if image is not None else None,  # fails before any request
            "stream": stream,
            **{k: v for k, v in sampling.items() if v is not None},
        }
        if self.session_id:
            body["session_id"] = self.session_id
        return body

    def _sse(self, body: dict[str, Any]) -> Iterator[Piece]:
        # Leaving this block early (close / Ctrl-C) drops the connection: the server aborts the generation.
        with self._transport_errors(), self._http.stream("POST", "/chat", json=body) as response:
            if response.status_code != 200:
                raise error_from_http_body(response.status_code, response.read(), retry_after=_retry(response))
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise _sse_error(event["error"])
                if event.get("done"):
                    usage = event.get("usage") or {}
                    yield Piece(
                        "",
                        int(usage.get("prompt_tokens", 0)),
                        int(usage.get("completion_tokens", 0)),
                        event.get("finish_reason") or "stop",
                    )
                    return
                yield Piece(event.get("delta", ""))

    # --- transport ------------------------------------------------------------------------------------------
    def _json(self, method: str, path: str, **kw: Any) -> Any:
        with self._transport_errors():
            response = self._http.request(method, path, **kw)
            if response.status_code >= 400:
                raise error_from_http_body(response.status_code, response.content, retry_after=_retry(response))
            return response.json()

    def _transport_errors(self) -> _TransportErrors:
        return _TransportErrors(self.url, self.timeout)

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TransportErrors:
    """Turns httpx's transport failures (and unreadable JSON) into the client's errors."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, httpx.TimeoutException):
            raise RequestTimeoutError(f"no answer from {self.url} within {self.timeout}s") from exc
        if isinstance(exc, httpx.TransportError):
            raise ServerUnavailableError(f"cannot reach {self.url}: {exc}") from exc
        if isinstance(exc, json.JSONDecodeError):
            raise ServerError(f"unreadable response from {self.url}: {exc}") from exc


def _retry(response: httpx.Response) -> str | None:
    return response.headers.get("retry-after")


def _sse_error(error: Any) -> DsaClientError:
    if isinstance(error, dict):
        return error_for_status(int(error.get("code") or 500), str(error.get("message")), code=error.get("type"))
    return ServerError(str(error))
