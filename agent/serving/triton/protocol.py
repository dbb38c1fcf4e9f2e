"""The Triton door's tensor contract (docs/api.md "Door 2"), shared by model.py, the gateway engine and the clients.

Pure numpy: no Triton import, so every encode/decode rule is unit-tested without a server. The model is configured
with `max_batch_size > 0`, so every tensor carries a leading batch dimension of 1 (`[1, 1]`, images `[1, N]`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.config import Settings
from agent.engine import errors
from agent.engine.images import ImageLimits, decode_b64_image, encode_png_b64
from agent.engine.types import (
    GenerationChunk,
    GenerationRequest,
    ImagePart,
    Message,
    Part,
    SamplingParams,
    TextPart,
    new_request_id,
)

TEXT_INPUT = "text_input"
MESSAGES = "messages"
IMAGE = "image"
MAX_TOKENS = "max_tokens"
TEMPERATURE = "temperature"
TOP_P = "top_p"
SEED = "seed"
STREAM = "stream"
IGNORE_EOS = "ignore_eos"
STOP = "stop"

TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
OUTPUT_NAMES = (TEXT_OUTPUT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS)

# Triton datatype of every input, as tritonclient's InferInput wants it.
INPUT_DATATYPES: dict[str, str] = {
    TEXT_INPUT: "BYTES",
    MESSAGES: "BYTES",
    IMAGE: "BYTES",
    MAX_TOKENS: "INT32",
    TEMPERATURE: "FP32",
    TOP_P: "FP32",
    SEED: "INT64",
    STREAM: "BOOL",
    IGNORE_EOS: "BOOL",
    STOP: "BYTES",
}

_ROLES = ("system", "user", "assistant")
# Triton may prefix our message (e.g. "[request id: 1] "): search for "<status> <code>: " anywhere at a word start.
_ERROR_PREFIX = re.compile(r"(?:^|\s)(?P<status>\d{3}) (?P<code>[a-z_]+): (?P<message>.*)$", re.S)

TensorGetter = Callable[[str], "np.ndarray | None"]


class ValidationFailed(errors.EngineError):
    """Wrong type or out-of-range value (422 in the error table)."""

    status, code = 422, "validation_error"


@dataclass(frozen=True)
class RequestLimits:
    """Defaults and limits applied when decoding a request; built from the same Settings as the FastAPI door."""

    image: ImageLimits = field(default_factory=ImageLimits)
    max_images: int = 4
    max_message_chars: int = 32_000
    max_new_tokens: int = 512
    default_temperature: float = 0.7
    default_top_p: float = 0.9
    max_stop_chars: int = 256
    max_stops: int = 4  # as OpenAI's `stop`

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            image=ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
            max_images=settings.max_images_per_request,
            max_message_chars=settings.max_message_chars,
            max_new_tokens=settings.max_new_tokens,
            default_temperature=settings.temperature,
            default_top_p=settings.top_p,
            max_stop_chars=settings.max_stop_chars,
        )


@dataclass(frozen=True)
class DecodedRequest:
    """One Triton request translated for the engine, plus how the answer goes back."""

    request: GenerationRequest
    stream: bool


# --------------------------------------------------------------------------------------------------------- errors
def error_message(exc: errors.EngineError) -> str:
    """The Triton error text for an engine error: starts with the status and code, e.g. `400 invalid_request: ...`."""
    return f"{exc.status} {exc.code}: {exc.message}"


_BY_CODE: dict[str, type[errors.EngineError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidRequestError,
        errors.UnsupportedInputError,
        errors.PayloadTooLargeError,
        errors.NotFoundError,
        errors.OverloadedError,
        errors.NotReadyError,
        errors.ModelLoadError,
        errors.EngineFailure,
        ValidationFailed,
    )
}


def error_from_message(message: str) -> errors.EngineError:
    """Inverse of `error_message` for the gateway: a Triton error text -> the engine error it came from.

    Errors raised by Triton itself (wrong dtype or shape, unknown model) carry no code: they are bad requests when
    Triton says so, else engine failures.
    """
    match = _ERROR_PREFIX.search(message.strip())
    if match and match.group("code") in _BY_CODE:
        return _BY_CODE[match.group("code")](match.group("message"))
    lowered = message.lower()
    if any(word in lowered for word in ("data-type", "datatype", "unexpected shape", "expects", "expected")):
        return errors.InvalidRequestError(message)
    if "unavailable" in lowered or "not ready" in lowered or "not found" in lowered:
        return errors.NotReadyError(message, retry_after=1.0)
    return errors.EngineFailure(message)


# --------------------------------------------------------------------------------------------------------- decoding
def _scalar(get: TensorGetter, name: str) -> Any | None:
    array = get(name)
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise errors.InvalidRequestError(f"{name}: expected one value per request, got {flat.size}")
    return flat[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise errors.InvalidRequestError(f"{name}: not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise errors.InvalidRequestError(f"{name}: expected a UTF-8 string")


def _image_from_url(part: dict[str, Any]) -> str:
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise errors.InvalidRequestError("messages: image_url part needs a data URL")
    return url


@dataclass(frozen=True)
class _PendingImage:
    """An image part whose base64 is decoded after the part count is checked against MAX_IMAGES_PER_REQUEST."""

    b64: str


def _unicode(text: str) -> str:
    """JSON allows lone UTF-16 surrogates (`"\\ud800"`); tokenizers and UTF-8 outputs do not: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidRequestError("messages: invalid Unicode (a lone surrogate)") from None
    return text


def _parts(content: Any) -> list[Part | _PendingImage]:
    """OpenAI-shaped content (a string or a list of `text` / `image_url` parts) -> parts with images pending."""
    if isinstance(content, str):
        return [TextPart(_unicode(content))]
    if not isinstance(content, list):
        raise errors.InvalidRequestError("messages: content must be a string or a list of parts")
    parts: list[Part | _PendingImage] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(TextPart(_unicode(part["text"])))
        elif kind == "image_url":
            parts.append(_PendingImage(_image_from_url(part)))
        else:
            raise errors.InvalidRequestError(f"messages: unsupported content part {kind!r}")
    return parts


def parse_messages(raw: str, limits: RequestLimits) -> list[Message]:
    """The `messages` JSON (OpenAI shape) -> engine messages with decoded, size-checked images."""
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise errors.InvalidRequestError(f"messages: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise errors.InvalidRequestError("messages: JSON nested too deeply") from None
    if not isinstance(items, list):
        raise errors.InvalidRequestError("messages: expected a JSON list of {role, content}")
    pending: list[tuple[str, list[Part | _PendingImage]]] = []
    for item in items:
        if not isinstance(item, dict) or item.get("role") not in _ROLES:
            raise errors.InvalidRequestError(f"messages: each item needs a role in {_ROLES}")
        pending.append((item["role"], _parts(item.get("content", ""))))
    count = sum(isinstance(p, _PendingImage) for _, parts in pending for p in parts)
    if count > limits.max_images:
        raise errors.PayloadTooLargeError(f"messages: more than MAX_IMAGES_PER_REQUEST={limits.max_images} images")
    return [
        Message(
            role=role,  # type: ignore[arg-type]
            parts=tuple(
                ImagePart(decode_b64_image(p.b64, limits.image)) if isinstance(p, _PendingImage) else p for p in parts
            ),
        )
        for role, parts in pending
    ]


def _float(value: Any) -> float:
    # FP32 on the wire: 0.7 arrives as 0.699999988; its shortest decimal form is what the sender meant.
    return float(str(np.float32(value)))


def _sampling(get: TensorGetter, limits: RequestLimits) -> SamplingParams:
    max_tokens = _scalar(get, MAX_TOKENS)
    temperature = _scalar(get, TEMPERATURE)
    top_p = _scalar(get, TOP_P)
    seed = _scalar(get, SEED)
    ignore_eos = _scalar(get, IGNORE_EOS)
    stop_array = get(STOP)
    stop = () if stop_array is None else tuple(_text(v, STOP) for v in np.asarray(stop_array).reshape(-1))
    if any(not s for s in stop):
        raise ValidationFailed("stop: stop strings must not be empty")
    if len(stop) > limits.max_stops or any(len(s) > limits.max_stop_chars for s in stop):
        raise ValidationFailed(
            f"stop: at most {limits.max_stops} strings of at most MAX_STOP_CHARS={limits.max_stop_chars} characters"
        )
    max_new = limits.max_new_tokens if max_tokens is None else int(max_tokens)
    if max_new < 1:
        raise ValidationFailed(f"max_tokens: must be >= 1, got {max_new}")
    temp = limits.default_temperature if temperature is None else _float(temperature)
    if not 0.0 <= temp <= 2.0:
        raise ValidationFailed(f"temperature: must be within [0, 2], got {temp}")
    p = limits.default_top_p if top_p is None else _float(top_p)
    if not 0.0 < p <= 1.0:
        raise ValidationFailed(f"top_p: must be within (0, 1], got {p}")
    return SamplingParams(
        # MAX_NEW_TOKENS is the default and the upper bound (as in the FastAPI door).
        max_new_tokens=min(max_new, limits.max_new_tokens),
        temperature=temp,
        top_p=p,
        seed=None if seed is None else int(seed),
        stop=stop,
        ignore_eos=bool(ignore_eos) if ignore_eos is not None else False,
    )


def decode_request(get: TensorGetter, limits: RequestLimits, request_id: str | None = None) -> DecodedRequest:
    """Input tensors (looked up by name; None when absent) -> the engine request. Raises EngineError subclasses."""
    raw_messages = _scalar(get, MESSAGES)
    text = _scalar(get, TEXT_INPUT)
    if raw_messages is None and text is None:
        raise errors.InvalidRequestError(f"one of the inputs {TEXT_INPUT!r} or {MESSAGES!r} is required")
    messages = [] if raw_messages is None else parse_messages(_text(raw_messages, MESSAGES), limits)
    image_array = get(IMAGE)
    b64_images = [] if image_array is None else [_text(v, IMAGE) for v in np.asarray(image_array).reshape(-1)]
    if len(b64_images) + sum(len(m.images) for m in messages) > limits.max_images:
        raise errors.PayloadTooLargeError(f"image: more than MAX_IMAGES_PER_REQUEST={limits.max_images} images")
    images = [ImagePart(decode_b64_image(b64, limits.image)) for b64 in b64_images]
    if text is not None:
        user_text = _text(text, TEXT_INPUT)
        if len(user_text) > limits.max_message_chars:
            raise errors.PayloadTooLargeError(f"text_input: longer than MAX_MESSAGE_CHARS={limits.max_message_chars}")
        messages.append(Message(role="user", parts=(*images, TextPart(user_text))))
    elif images:
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not users:
            raise errors.InvalidRequestError("image: needs a user message to attach to")
        last = messages[users[-1]]
        messages[users[-1]] = Message(role="user", parts=(*images, *last.parts))
    if not messages or messages[-1].role != "user":
        raise errors.InvalidRequestError("messages: the conversation must end with a user message")
    stream = _scalar(get, STREAM)
    request = GenerationRequest(
        messages=tuple(messages), sampling=_sampling(get, limits), request_id=request_id or new_request_id()
    )
    return DecodedRequest(request=request, stream=bool(stream) if stream is not None else False)


# --------------------------------------------------------------------------------------------------------- encoding
def _bytes_tensor(values: Sequence[str]) -> np.ndarray:
    return np.array([[v.encode("utf-8") for v in values]], dtype=np.object_)


def messages_json(messages: Sequence[Message]) -> str:
    """Engine messages -> the `messages` JSON (images as PNG data URLs: lossless, so both doors see equal pixels)."""
    items = []
    for m in messages:
        parts: list[dict[str, Any]] = []
        for p in m.parts:
            if isinstance(p, ImagePart):
                url = "data:image/png;base64," + encode_png_b64(p.image)
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append({"type": "text", "text": p.text})
        items.append({"role": m.role, "content": parts})
    return json.dumps(items, ensure_ascii=False)


def encode_request(request: GenerationRequest, *, stream: bool) -> dict[str, np.ndarray]:
    """An engine request -> input tensors (batch dimension included), as the gateway engine sends them."""
    s = request.sampling
    tensors = {
        MESSAGES: _bytes_tensor([messages_json(request.messages)]),
        MAX_TOKENS: np.array([[s.max_new_tokens]], dtype=np.int32),
        TEMPERATURE: np.array([[s.temperature]], dtype=np.float32),
        TOP_P: np.array([[s.top_p]], dtype=np.float32),
        STREAM: np.array([[stream]], dtype=np.bool_),
    }
    if s.seed is not None:
        tensors[SEED] = np.array([[s.seed]], dtype=np.int64)
    if s.ignore_eos:
        tensors[IGNORE_EOS] = np.array([[True]], dtype=np.bool_)
    if s.stop:
        tensors[STOP] = _bytes_tensor(list(s.stop))
    return tensors


def chunk_outputs(text: str, chunk: GenerationChunk) -> dict[str, np.ndarray]:
    """Output tensors for one response: `text` (a delta or the whole answer) and the chunk's counts and reason."""
    return {
        TEXT_OUTPUT: _bytes_tensor([text]),
        FINISH_REASON: _bytes_tensor([chunk.finish_reason or ""]),
        PROMPT_TOKENS: np.array([[chunk.prompt_tokens]], dtype=np.int32),
        COMPLETION_TOKENS: np.array([[chunk.completion_tokens]], dtype=np.int32),
    }


def outputs_chunk(get: TensorGetter, request_id: str) -> GenerationChunk:
    """Output tensors of one response -> a chunk (the gateway engine's side)."""
    text = _scalar(get, TEXT_OUTPUT)
    reason = _scalar(get, FINISH_REASON)
    prompt = _scalar(get, PROMPT_TOKENS)
    completion = _scalar(get, COMPLETION_TOKENS)
    finish = _text(reason, FINISH_REASON) if reason is not None else ""
    return GenerationChunk(
        request_id=request_id,
        text="" if text is None else _text(text, TEXT_OUTPUT),
        prompt_tokens=0 if prompt is None else int(prompt),
        completion_tokens=0 if completion is None else int(completion),
        finish_reason=finish or None,  # type: ignore[arg-type]
    )
