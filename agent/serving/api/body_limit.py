"""Request body limit (MAX_BODY_BYTES): 413 from the Content-Length header, and again while the body is read.

A client can omit Content-Length (chunked upload) or lie about it, so the body is read here, counted, and replayed
to the app; nothing past the limit is buffered.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.serving.api.errors import error_payload


class BodyLimitMiddleware:
    """Answer 413 `payload_too_large` to bodies over `max_bytes`; replay accepted bodies to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(scope, receive, send, declared, more=False)
            return
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # http.disconnect: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, size, more=message.get("more_body", False))
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: int, *, more: bool = True) -> None:
        at_least = "at least " if more else ""
        body = error_payload(
            413, "payload_too_large", f"request body: {at_least}{size} bytes, more than MAX_BODY_BYTES={self.max_bytes}"
        )
        # Connection: close, because the rest of the body is left unread.
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
