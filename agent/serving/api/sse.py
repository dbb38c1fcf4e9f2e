"""Streaming and disconnect helpers shared by the seed and OpenAI routes.

- `first_event`: run a stream up to its first event *before* the response starts, so errors that happen before
  any output (404, 400, 429, 503) are normal JSON errors with their status code, not an SSE event.
- `sse_response`: the stream as Server-Sent Events; an error after the stream started is sent as one
  `data: {"error": {...}}` event and the stream ends (docs/api.md). Client disconnects cancel the stream, which
  closes the engine's generator and aborts the engine request.
- `cancel_on_disconnect`: the same abort for non-streaming routes, which Starlette does not cancel by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from sse_starlette import EventSourceResponse

from agent.engine.errors import EngineError
from agent.serving.api.errors import ClientDisconnectedError, engine_error_payload, error_payload, request_id

log = logging.getLogger(__name__)

T = TypeVar("T")
PING_SECONDS = 15  # keeps proxies from closing a stream while a long prompt is prefilled


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine request) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnectedError(f"request {request_id(request)}: client disconnected")
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def first_event(request: Request, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Run `stream` to its first event now (errors raise here), and return a stream that replays it."""
    try:
        first = await cancel_on_disconnect(request, anext(stream))
    except StopAsyncIteration:
        first = None
    except BaseException:
        await _close(stream)
        raise

    async def replay() -> AsyncIterator[T]:
        try:
            if first is None:
                return
            yield first
            async for event in stream:
                yield event
        finally:
            await _close(stream)

    return replay()


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def sse_response(
    request: Request, events: AsyncIterator[T], encode: Callable[[T], dict[str, Any] | str], *, done: str | None = None
) -> EventSourceResponse:
    """`events` as SSE `data:` lines (`encode` gives a JSON object or a raw string), then `done` if given."""
    rid = request_id(request)

    async def lines() -> AsyncIterator[dict[str, str]]:
        try:
            async for event in events:
                data = encode(event)
                yield {"data": data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}
        except EngineError as exc:
            if exc.status >= 500 and exc.status != 503:
                log.error("request %s: %s: %s", rid, exc.code, exc.message)
            yield {"data": json.dumps(engine_error_payload(exc))}
            return
        except Exception:
            log.exception("request %s: stream failed", rid)
            yield {"data": json.dumps(error_payload(500, "engine_failure", f"internal error (request id {rid})"))}
            return
        finally:
            await _close(events)
        if done is not None:
            yield {"data": done}

    return EventSourceResponse(lines(), sep="\n", ping=PING_SECONDS)
