"""What the Triton HTTP and gRPC clients share: model metadata, request building, the conversation, chat/stream_chat.

Each transport subclass implements `_pieces` (the server's responses for one request), `_live_and_ready`,
`model_metadata` and `close`. See agent.client.triton_client for the public classes.
"""

from __future__ import annotations

import abc
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.client.conversation import ChatResult, ChatStream, Conversation, ImageInput, Piece, Turn, encode_image
from agent.client.errors import DsaClientError, InvalidInputError
from agent.serving.triton import protocol as proto  # the tensor names: one contract with the model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen3-vl"
# Seconds to wait at each step of a generation: connecting, then the whole answer (chat) or each piece (streams).
# Generous: a long non-streamed answer of a large model can take minutes; a server that is down fails at once.
DEFAULT_TIMEOUT = 300.0
# Seconds for quick control calls (health, readiness, metadata) and for connecting.
CONTROL_TIMEOUT = 10.0


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the model: name, Triton datatype, shape (-1 = variable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What Triton says about the model (`GET /v2/models/<name>`)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelMetadata:
        def specs(key: str) -> tuple[TensorSpec, ...]:
            tensors = data.get(key, ())
            return tuple(TensorSpec(t["name"], t["datatype"], tuple(map(int, t.get("shape", ())))) for t in tensors)

        return cls(
            name=data.get("name", ""),
            versions=tuple(data.get("versions", ())),
            platform=data.get("platform", ""),
            inputs=specs("inputs"),
            outputs=specs("outputs"),
        )


@dataclass(frozen=True)
class _Request:
    """One generation request in the model's terms (docs/api.md, Door 2)."""

    text: str
    messages: list[dict[str, str]]
    images: list[str]
    sampling: dict[str, int | float]
    stream: bool
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class _TritonClient(abc.ABC):
    """What both transports share: the conversation, request building, chat / stream_chat on top of `_pieces`.

    Arguments: `url` host:port (a scheme is ignored); `model_name` (default TRITON_MODEL_NAME or qwen3-vl);
    `model_version` ("" lets Triton's version policy choose); `timeout` seconds per generation step (the whole
    answer for `chat`, each piece for `stream_chat`; connecting and control calls wait at most CONTROL_TIMEOUT);
    `max_history` user+assistant turns kept and resent (default MAX_HISTORY from the environment, else 5).
    """

    def __init__(
        self,
        url: str,
        *,
        model_name: str | None = None,
        model_version: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        max_history: int | None = None,
    ) -> None:
        self.url = url.removeprefix("http://").removeprefix("https://").rstrip("/")
        self.model_name = model_name or os.environ.get("TRITON_MODEL_NAME") or DEFAULT_MODEL
        self.model_version = model_version
        self.timeout = timeout
        self.conversation = Conversation(max_history)

    # --- conversation ---------------------------------------------------------------------------------------
    @property
    def history(self) -> list[Turn]:
        """The kept turns, oldest first (user and assistant alternate)."""
        return self.conversation.snapshot()

    def clear_history(self) -> None:
        """Forget the conversation: the next `chat()` starts fresh."""
        self.conversation.clear()

    # --- chat -----------------------------------------------------------------------------------------------
    def chat(self, message: str, image: ImageInput | None = None, **sampling: Any) -> tuple[str, float]:
        """Ask one question; returns (answer, seconds). Sampling: max_new_tokens, temperature, top_p, seed,
        use_history (default True: send the kept conversation and record this turn)."""
        result = self.complete(message, image, **sampling)
        return result.text, result.seconds

    def complete(
        self,
        message: str,
        image: ImageInput | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_history: bool = True,
    ) -> ChatResult:
        """Like `chat` but returns the whole `ChatResult` (text, seconds, token counts, finish reason)."""
        request = self._build(message, image, max_new_tokens, temperature, top_p, seed, use_history, stream=False)
        return self._open(request, message, image is not None, use_history).collect()

    def stream_chat(
        self,
        message: str,
        image: ImageInput | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_history: bool = True,
    ) -> ChatStream:
        """Ask one question and iterate the answer's text deltas as they are generated.

        `stream.result` holds the `ChatResult` once iteration ends; `stream.close()` cancels the generation.
        """
        request = self._build(message, image, max_new_tokens, temperature, top_p, seed, use_history, stream=True)
        return self._open(request, message, image is not None, use_history)

    def _build(
        self,
        message: str,
        image: ImageInput | None,
        max_new_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        use_history: bool,
        *,
        stream: bool,
    ) -> _Request:
        if not isinstance(message, str) or not message.strip():
            raise InvalidInputError("message: expected a non-empty string")
        images = [encode_image(image)] if image is not None else []  # fails here, before any request
        sampling = _sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        turns = self.conversation.snapshot() if use_history else []
        return _Request(message, [t.to_message() for t in turns], images, sampling, stream)

    def _open(self, request: _Request, message: str, has_image: bool, use_history: bool) -> ChatStream:
        def record(result: ChatResult) -> None:
            if use_history and result.finish_reason != "abort":
                self.conversation.add_exchange(message, result.text, has_image=has_image)

        return ChatStream(self._pieces(request), on_complete=record)

    # --- transport ------------------------------------------------------------------------------------------
    def check_health(self) -> bool:
        """True if the server is live and the model is ready; False (never an exception) if not or unreachable."""
        try:
            return self._live_and_ready()
        except DsaClientError as exc:
            log.info("health check of %s failed: %s", self.url, exc)
            return False

    @abc.abstractmethod
    def _live_and_ready(self) -> bool: ...

    @abc.abstractmethod
    def model_metadata(self) -> ModelMetadata:
        """The model's name, versions, platform, inputs and outputs."""

    @abc.abstractmethod
    def _pieces(self, request: _Request) -> Iterator[Piece]:
        """The server's responses for one request; closing the iterator early cancels it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> _TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sampling(
    *, max_new_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None
) -> dict[str, int | float]:
    """The set sampling values under the model's input names, type-checked before any request."""
    out: dict[str, int | float] = {}
    for name, value, kind in (
        (proto.MAX_TOKENS, max_new_tokens, int),
        (proto.SEED, seed, int),
        (proto.TEMPERATURE, temperature, float),
        (proto.TOP_P, top_p, float),
    ):
        if value is None:
            continue
        allowed = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise InvalidInputError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        out[name] = kind(value)
    return out
