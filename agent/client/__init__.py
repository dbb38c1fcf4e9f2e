"""Python clients of newbie-app: the Triton door (HTTP and gRPC), the FastAPI door, and their errors.

The clients are imported lazily (tritonclient pulls in gevent and grpc), so `from agent.client import RestClient`
does not load them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.client.conversation import ChatResult, ChatStream, Turn
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
)

if TYPE_CHECKING:
    from agent.client.rest_client import RestClient
    from agent.client.triton_client import TritonGrpcClient, TritonHttpClient

__all__ = [
    "ChatResult",
    "ChatStream",
    "DsaClientError",
    "InvalidInputError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "RestClient",
    "ServerError",
    "ServerUnavailableError",
    "TritonGrpcClient",
    "TritonHttpClient",
    "Turn",
]

_LAZY = {
    "RestClient": "agent.client.rest_client",
    "TritonHttpClient": "agent.client.triton_client",
    "TritonGrpcClient": "agent.client.triton_client",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agent.client' has no attribute {name!r}")
