"""The seed's routes: /health, /chat, /load_model, /clear_history, /history (docs/api.md). Thin: the chat
service does the work; schemas validate; errors are raised and turned into JSON by `api.errors`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from agent.serving.api.auth import AdminDep, PrincipalDep
from agent.serving.api.deps import RunnerDep, ServiceDep
from agent.serving.api.engine_runner import LOADING_RETRY_AFTER
from agent.serving.api.schemas import (
    ChatRequest,
    ChatResponse,
    ClearHistoryRequest,
    ClearHistoryResponse,
    EngineInfoOut,
    HealthResponse,
    HistoryResponse,
    LoadModelRequest,
    LoadModelResponse,
    SessionId,
    TurnOut,
)
from agent.serving.api.sse import cancel_on_disconnect, first_event, sse_response
from agent.serving.api.store import StoreUnavailableError
from agent.serving.inference_engine import ChatDelta, ChatEvent

router = APIRouter(tags=["chat"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text}
    for code, text in {
        400: "invalid input (bad base64, image on a text-only model)",
        404: "unknown session",
        413: "message, image or body over a limit",
        422: "validation error",
        429: "overloaded (Retry-After)",
        503: "model loading (Retry-After)",
    }.items()
}


@router.get(
    "/health",
    response_model=HealthResponse,
    response_model_exclude_none=True,  # `versions` only in gateway mode
    responses={503: {"description": '{"status": "loading"} until ready'}},
)
async def health(runner: RunnerDep, service: ServiceDep) -> Any:
    """Ready (200, with the loaded model), not yet (503 `{"status": "loading"}`), or `degraded` (503) while the
    history database is unreachable (it recovers by itself when the database returns)."""
    status = runner.status()
    if status.state != "ready" or status.info is None or not await runner.healthy():
        body: dict[str, Any] = {"status": "unavailable" if status.state == "ready" else status.state}
        if status.error:
            body["error"] = status.error
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(int(LOADING_RETRY_AFTER))})
    try:
        await service.store.ping()
    except StoreUnavailableError as exc:
        body = {"status": "degraded", "error": f"history store ({service.store.kind}): {exc.message}"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(int(exc.retry_after or 1))})
    return HealthResponse(
        model=EngineInfoOut.of(status.info),
        engine=status.info.engine,
        running=status.running,
        waiting=status.waiting,
        versions=await runner.versions(),
    )


@router.post(
    "/chat",
    response_model=ChatResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream: true"}, **_ERRORS},
)
async def chat(body: ChatRequest, request: Request, service: ServiceDep, principal: PrincipalDep) -> Any:
    """Answer one message in a session (the caller's default session if none), whole or streamed as SSE."""
    sampling = body.sampling(service.limits)
    if body.stream:
        stream = service.chat_stream(body.session_id, body.message, body.image_base64, sampling, principal)
        return sse_response(request, await first_event(request, stream), _chat_event)
    reply = await cancel_on_disconnect(
        request, service.chat(body.session_id, body.message, body.image_base64, sampling, principal)
    )
    return ChatResponse.of(reply)


def _chat_event(event: ChatEvent) -> dict[str, Any]:
    if isinstance(event, ChatDelta):
        return {"delta": event.text}
    return {"done": True, **ChatResponse.of(event).model_dump()}


@router.post("/load_model", response_model=LoadModelResponse, responses={422: {"description": "cannot load it"}})
async def load_model(runner: RunnerDep, admin: AdminDep, body: LoadModelRequest | None = None) -> LoadModelResponse:
    """Load another model (or the same one with other settings); the current one serves until the swap. Admins
    only (403 for learners)."""
    info = await runner.load_model(body.changes() if body else {})
    return LoadModelResponse(model=EngineInfoOut.of(info))


@router.post("/clear_history", response_model=ClearHistoryResponse, responses={404: {"description": "unknown"}})
async def clear_history(
    service: ServiceDep, principal: PrincipalDep, body: ClearHistoryRequest | None = None
) -> ClearHistoryResponse:
    """Forget a session's conversation (the caller's default session if none is named)."""
    session = await service.clear_history(body.session_id if body else None, principal)
    return ClearHistoryResponse(session_id=session)


@router.get("/history", response_model=HistoryResponse, responses={404: {"description": "unknown session"}})
async def history(
    service: ServiceDep, principal: PrincipalDep, session_id: Annotated[SessionId | None, Query()] = None
) -> HistoryResponse:
    """A session's conversation, oldest first (images are not stored: `has_image` says a turn had one)."""
    session, turns = await service.history(session_id, principal)
    return HistoryResponse(session_id=session, history=[TurnOut.of(t) for t in turns])
