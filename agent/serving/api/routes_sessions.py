"""Session routes for the web UI and tools: list, create, delete (docs/api.md, "Sessions")."""

from __future__ import annotations

from fastapi import APIRouter

from agent.serving.api.deps import ServiceDep
from agent.serving.api.schemas import SessionCreated, SessionDeleted, SessionId, SessionOut, SessionsResponse

router = APIRouter(prefix="/sessions", tags=["sessions"])


@router.get("", response_model=SessionsResponse)
async def list_sessions(service: ServiceDep) -> SessionsResponse:
    """Every session, most recently updated first."""
    return SessionsResponse(sessions=[SessionOut.of(s) for s in await service.store.sessions()])


@router.post("", response_model=SessionCreated, status_code=200)
async def create_session(service: ServiceDep) -> SessionCreated:
    """A new, empty session; pass its id as `session_id` to /chat, /history and /clear_history."""
    return SessionCreated(session_id=await service.store.create())


@router.delete("/{session_id}", response_model=SessionDeleted, responses={404: {"description": "unknown session"}})
async def delete_session(session_id: SessionId, service: ServiceDep) -> SessionDeleted:
    """Delete a session and its history."""
    await service.delete_session(session_id)
    return SessionDeleted(session_id=session_id)
