"""`GET /usage` (tokens and requests per principal and UTC day, from the shared store) and `GET /me` (the caller).

Learners see their own usage; admins see everyone's, or one principal's with `?principal=`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from agent.serving.api.auth import PrincipalDep
from agent.serving.api.deps import ServiceDep
from agent.serving.api.principals import NAME_PATTERN, Role

router = APIRouter(tags=["usage"])

Day = Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$", description="YYYY-MM-DD (UTC), inclusive")]


class UsageRowOut(BaseModel):
    principal: str
    role: str
    day: str = Field(description="YYYY-MM-DD (UTC)")
    requests: int
    prompt_tokens: int
    completion_tokens: int


class UsageResponse(BaseModel):
    usage: list[UsageRowOut] = Field(description="newest day first")


class MeResponse(BaseModel):
    name: str
    role: str
    max_concurrent: int = Field(description="requests generating at once (0 = no limit)")
    tokens_per_minute: int = Field(description="0 = no limit")


@router.get("/usage", response_model=UsageResponse, responses={403: {"description": "another principal's usage"}})
async def usage(
    service: ServiceDep,
    caller: PrincipalDep,
    since: Day = None,
    until: Day = None,
    principal: Annotated[str | None, Query(pattern=NAME_PATTERN.pattern, description="admins only")] = None,
) -> UsageResponse:
    """Requests and tokens per principal and day: the caller's own (learners), everyone's (admins)."""
    if principal is not None and principal != caller.name:
        caller.require(Role.admin, "GET /usage?principal=<another principal>")
    who = principal if caller.is_admin else caller.name
    rows = await service.store.usage(who, since, until)
    return UsageResponse(usage=[UsageRowOut(**asdict(r)) for r in rows])


@router.get("/me", response_model=MeResponse)
async def me(service: ServiceDep, caller: PrincipalDep) -> MeResponse:
    """Who the caller is, with their limits (the web UI shows the name)."""
    concurrent, tpm = service.quotas.limits_of(caller) if service.quotas else (0, 0)
    return MeResponse(name=caller.name, role=str(caller.role), max_concurrent=concurrent, tokens_per_minute=tpm)
