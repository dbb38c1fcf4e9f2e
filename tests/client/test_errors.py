"""The documented exception tree, mapped from tritonclient's exceptions and from HTTP error bodies."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from agent.client.errors import (
    DsaClientError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
    error_from_http_body,
    error_from_triton,
)


@pytest.mark.parametrize(
    ("message", "status", "expected", "http_status", "code"),
    [
        # the model's own errors (docs/api.md): the "NNN code:" prefix decides, whatever the transport status
        ("400 invalid_request: bad base64", "StatusCode.INTERNAL", InvalidInputError, 400, "invalid_request"),
        ("413 payload_too_large: image: too big", "400", PayloadTooLargeError, 413, "payload_too_large"),
        ("503 not_ready: model loading", "StatusCode.UNAVAILABLE", ModelNotReadyError, 503, "not_ready"),
        ("429 overloaded: queue full", None, OverloadedError, 429, "overloaded"),
        ("500 engine_failure: boom", None, ServerError, 500, "engine_failure"),
        # transport statuses
        ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", ServerUnavailableError, None, None),
        ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", RequestTimeoutError, None, None),
        ("Request for unknown model: 'nope' is not found", "StatusCode.UNAVAILABLE", ModelNotFoundError, 404, None),
        ("Request for unknown model: 'nope' has no available versions", "400", ModelNotFoundError, 404, None),
        ("bad json", "400", InvalidInputError, 400, None),
        ("Not Implemented", "501", ServerError, 501, None),
        ("unknown tensor", "StatusCode.INVALID_ARGUMENT", InvalidInputError, 400, None),
        ("too busy", "StatusCode.RESOURCE_EXHAUSTED", OverloadedError, 429, None),
    ],
)
def test_triton_exceptions_map_onto_the_tree(
    message: str, status: str | None, expected: type, http_status: int | None, code: str | None
) -> None:
    error = error_from_triton(InferenceServerException(message, status=status))
    assert type(error) is expected
    assert isinstance(error, DsaClientError)
    assert (error.status, error.code) == (http_status, code)
    assert message in str(error)


def test_timeouts_are_also_builtin_timeout_errors() -> None:
    assert isinstance(RequestTimeoutError("slow"), TimeoutError)


def test_fastapi_error_body_with_retry_after() -> None:
    body = b'{"error": {"message": "queue full", "type": "overloaded", "code": 429, "param": null}}'
    error = error_from_http_body(429, body, retry_after="3")
    assert isinstance(error, OverloadedError) and error.retry_after == 3.0 and error.code == "overloaded"
    loading = error_from_http_body(503, b'{"status": "loading"}', retry_after="5")
    assert isinstance(loading, ModelNotReadyError) and loading.retry_after == 5.0


def test_triton_error_body_and_unreadable_bodies() -> None:
    triton = error_from_http_body(400, b'{"error": "400 invalid_request: messages: not JSON"}')
    assert isinstance(triton, InvalidInputError) and triton.code == "invalid_request"
    html = error_from_http_body(502, b"<html>Bad Gateway</html>")
    assert isinstance(html, ServerError) and "Bad Gateway" in str(html)
