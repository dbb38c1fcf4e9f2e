"""Dependencies of the routes, as `Annotated` aliases (the objects live on `app.state`, set by the lifespan)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from agent.config import Settings
from agent.serving.api.engine_runner import EngineRunner
from agent.serving.inference_engine import ChatService


def get_service(request: Request) -> ChatService:
    return request.app.state.service


def get_runner(request: Request) -> EngineRunner:
    return request.app.state.service.runner


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


ServiceDep = Annotated[ChatService, Depends(get_service)]
RunnerDep = Annotated[EngineRunner, Depends(get_runner)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
