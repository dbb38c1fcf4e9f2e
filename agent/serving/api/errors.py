"""Every error of the FastAPI door as one JSON shape (docs/api.md), from the one table in agent.engine.errors.

`{"error": {"message": "...", "type": "<code>", "code": <status>, "param": null}}`, plus `Retry-After` on 429/503.
Pydantic validation -> 422 `validation_error`; malformed JSON -> 400 `invalid_request`; anything unexpected -> 500
`engine_failure`, logged with the request id (X-Request-ID), never disguised as a 4xx.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.engine.errors import EngineError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away"; only seen in logs and metrics
_SAFE_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")
# HTTP errors raised by the framework itself (unknown route, wrong method) in the same shape.
_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready (the work was cancelled; nobody reads the response)."""


def error_payload(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON error body of every route (and of an SSE `error` event)."""
    return {"error": {"message": message, "type": code, "code": status, "param": param}}


def engine_error_payload(exc: EngineError) -> dict[str, Any]:
    return error_payload(exc.status, exc.code, exc.message)


def error_response(exc: EngineError) -> JSONResponse:
    """An `EngineError` as a JSON response, with Retry-After when the error says when to come back."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return JSONResponse(engine_error_payload(exc), status_code=exc.status, headers=headers)


def request_id(request: Request) -> str:
    """The id of this request (from X-Request-ID, or generated), also sent back in the X-Request-ID header."""
    return getattr(request.state, "request_id", "-")


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """Pydantic errors -> one readable line naming each field, e.g. `temperature: Input should be ...`."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        text = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'body'}: {text}")
    return "; ".join(parts)


async def _engine_error_handler(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, EngineError):  # registered for EngineError only; anything else is not ours to dress up
        raise exc
    if exc.status >= 500 and exc.status != 503:
        log.error("request %s: %s: %s", request_id(request), exc.code, exc.message, exc_info=exc)
    return error_response(exc)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
        return JSONResponse(error_payload(400, "invalid_request", f"malformed JSON body: {detail}"), status_code=400)
    if any(tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes) for e in errors):
        # FastAPI parses JSON only when the request says it is JSON (a guard against cross-site form posts).
        message = "the body must be a JSON object sent with Content-Type: application/json"
        return JSONResponse(error_payload(400, "invalid_request", message), status_code=400)
    message = describe_validation_errors(errors)
    first = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(p) for p in first if p != "body") or None
    return JSONResponse(error_payload(422, "validation_error", message, param), status_code=422)


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    code = _HTTP_CODES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "engine_failure")
    return JSONResponse(
        error_payload(exc.status_code, code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


async def _disconnected_handler(request: Request, exc: Exception) -> Response:
    log.info("request %s: client disconnected, generation aborted", request_id(request))
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every known error into the JSON error body."""
    app.add_exception_handler(ClientDisconnectedError, _disconnected_handler)
    app.add_exception_handler(EngineError, _engine_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)


class RequestContextMiddleware:
    """Gives each request an id (X-Request-ID) and turns an unexpected exception into a logged 500 JSON error."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: %s %s failed", rid, scope.get("method"), scope.get("path"))
            if started:
                raise  # the response is half sent: let the server close the connection
            body = error_payload(500, "engine_failure", f"internal error (request id {rid}); see the server log")
            await JSONResponse(body, status_code=500)(scope, receive, send_with_id)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            return text if _SAFE_REQUEST_ID.match(text) else None
    return None
