"""Session routes for the web UI and tools: list, create, delete (docs/api.md, "Sessions").

Each caller sees and uses only their own sessions; another principal's session answers 404 (its existence is not
revealed). Admins may list everyone's with `?all=true` and open any session by id.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from agent.serving.api.auth import PrincipalDep
from agent.serving.api.deps import ServiceDep
from agent.serving.api.principals import Role
from agent.serving.api.schemas import SessionCreated, SessionDeleted, SessionId, SessionOut, SessionsResponse

router = APIRouter(prefix="/sessions", tags=["sessions"])


@router.get("", response_model=SessionsResponse, responses={403: {"description": "all=true by a learner"}})
async def list_sessions(
    service: ServiceDep,
    principal: PrincipalDep,
    all: Annotated[bool, Query(description="admins: every principal's sessions")] = False,
) -> SessionsResponse:
    """The caller's sessions, most recently updated first."""
    if all:
        principal.require(Role.admin, "GET /sessions?all=true")
    sessions = await service.store.sessions(None if all else principal.name)
    return SessionsResponse(sessions=[SessionOut.of(s) for s in sessions])


@router.post("", response_model=SessionCreated, status_code=200)
async def create_session(service: ServiceDep, principal: PrincipalDep) -> SessionCreated:
    """A new, empty session of the caller; pass its id as `session_id` to /chat, /history and /clear_history."""
    return SessionCreated(session_id=await service.store.create(owner=principal.name))


@router.delete("/{session_id}", response_model=SessionDeleted, responses={404: {"description": "unknown session"}})
async def delete_session(session_id: SessionId, service: ServiceDep, principal: PrincipalDep) -> SessionDeleted:
    """Delete one of the caller's sessions and its history."""
    await service.delete_session(session_id, principal)
    return SessionDeleted(session_id=session_id)
