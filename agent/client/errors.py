"""The client's exception tree: one base class, one subclass per thing a caller can act on.

```
DsaClientError                      anything this package raises on purpose
├── ServerUnavailableError          nothing answers at the URL (refused, DNS, reset) or the server is not live
├── ModelNotReadyError              the server is up but the model is loading / not ready (503 not_ready)
├── ModelNotFoundError              unknown model, version or session (404)
├── InvalidInputError               the request was refused as invalid (400/413/422), or failed a client-side check
│   └── PayloadTooLargeError        a message or image over a server limit (413)
├── OverloadedError                 the server's queue is full (429); `retry_after` says when to try again
├── RequestTimeoutError             no answer within the timeout (also a builtin TimeoutError)
└── ServerError                     the server failed (500) or answered something this client cannot read
```

Every error carries `status` (the HTTP status when one is known) and `code` (the server's error code, e.g.
`invalid_request`). The functions below translate tritonclient's `InferenceServerException`, HTTP statuses and
transport failures into this tree, so callers never need to catch tritonclient, grpc or httpx exceptions.
"""

from __future__ import annotations

import json
import re

from tritonclient.utils import InferenceServerException

__all__ = [
    "DsaClientError",
    "InvalidInputError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "ServerError",
    "ServerUnavailableError",
]


class DsaClientError(Exception):
    """Base of every error raised by agent.client. `status`: HTTP status if known; `code`: server error code."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class ServerUnavailableError(DsaClientError):
    """Nothing answers at the URL (connection refused, unknown host, reset), or the server reports it is not live."""


class ModelNotReadyError(DsaClientError):
    """The server answers but the model is still loading or not ready (503 `not_ready`)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ModelNotFoundError(DsaClientError):
    """The model, version or session does not exist on the server (404)."""


class InvalidInputError(DsaClientError):
    """The request is invalid: refused by the server (400/422) or caught before sending (e.g. a missing image)."""


class PayloadTooLargeError(InvalidInputError):
    """A message, image or body over one of the server's limits (413); the message names the limit."""


class OverloadedError(DsaClientError):
    """The server's queue is full (429). Retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class RequestTimeoutError(DsaClientError, TimeoutError):
    """No answer (or no next streamed piece) within the client's timeout."""


class ServerError(DsaClientError):
    """The server failed (5xx other than 503) or sent a response this client cannot interpret."""


# "400 invalid_request: image: invalid base64" — the prefix every error of the Triton model starts with (docs/api.md).
_STATUS_PREFIX = re.compile(r"(?P<status>[1-5]\d\d) (?P<code>[a-z_]+): ")
# gRPC status names tritonclient puts in InferenceServerException.status() ("StatusCode.UNAVAILABLE") -> HTTP status.
_GRPC_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501}


def error_for_status(
    status: int, message: str, *, code: str | None = None, retry_after: float | None = None
) -> DsaClientError:
    """The exception for an HTTP status (or a status parsed from a Triton error message)."""
    if status == 503:
        if code in (None, "not_ready"):
            return ModelNotReadyError(message, status=status, code=code, retry_after=retry_after)
        return ServerUnavailableError(message, status=status, code=code)
    if status == 429:
        return OverloadedError(message, status=status, code=code, retry_after=retry_after)
    if status == 413:
        return PayloadTooLargeError(message, status=status, code=code)
    if status == 404:
        return ModelNotFoundError(message, status=status, code=code)
    if status in (408, 504):
        return RequestTimeoutError(message, status=status, code=code)
    if 400 <= status < 500:
        return InvalidInputError(message, status=status, code=code)
    return ServerError(message, status=status, code=code)


def error_from_message(message: str, *, status: int | None = None) -> DsaClientError:
    """Parse a server error message: the docs/api.md prefix `NNN code: ...` wins over the transport's status."""
    found = _STATUS_PREFIX.search(message)
    if found:
        return error_for_status(int(found["status"]), message, code=found["code"])
    if "unknown model" in message.lower():  # Triton's own wording, whatever status the transport gave it
        return ModelNotFoundError(message, status=404)
    if status is not None:
        return error_for_status(status, message)
    return ServerError(message)


def error_from_triton(exc: InferenceServerException) -> DsaClientError:
    """Translate tritonclient's `InferenceServerException` (HTTP or gRPC) into the client's tree."""
    message = exc.message() or str(exc)
    raw_status = str(exc.status() or "")
    grpc_name = raw_status.removeprefix("StatusCode.")
    if _STATUS_PREFIX.search(message) or "unknown model" in message.lower():
        return error_from_message(message)
    if grpc_name == "UNAVAILABLE":
        return ServerUnavailableError(message)
    if grpc_name == "DEADLINE_EXCEEDED":
        return RequestTimeoutError(message)
    if grpc_name in _GRPC_STATUS:
        return error_for_status(_GRPC_STATUS[grpc_name], message)
    if raw_status.isdigit():
        return error_for_status(int(raw_status), message)
    if "failed to connect" in message.lower() or "connection refused" in message.lower():
        return ServerUnavailableError(message)
    return ServerError(message)


def error_from_http_body(status: int, body: bytes | str, *, retry_after: str | None = None) -> DsaClientError:
    """Translate an HTTP error response: FastAPI's `{"error": {"message", "type", "code"}}` or Triton's
    `{"error": "..."}`, falling back to the raw text."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    message, code = text.strip() or f"HTTP {status}", None
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        message, code = str(error.get("message", message)), error.get("type")
    elif isinstance(error, str):
        return error_from_message(error, status=status)
    wait = _parse_retry_after(retry_after)
    return error_for_status(status, message, code=code, retry_after=wait)


def _parse_retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
