"""Request rules: the one place that says what a request may ask for, used by both doors.

FastAPI (`agent.serving.api`) and Triton (`agent.serving.triton.protocol`) translate their wire formats, then call
these functions; a broken rule raises an error from the table in `agent.engine.errors`, so the same bad request gets
the same status and the same message at either door:

| rule | error (status) |
|---|---|
| max tokens: 1 .. MAX_NEW_TOKENS (default MAX_NEW_TOKENS) | `InvalidValueError` (422) |
| temperature: [0, 2] (default TEMPERATURE); top_p: (0, 1] (default TOP_P) | `InvalidValueError` (422) |
| seed: [0, 2**63-1] (default: none) | `InvalidValueError` (422) |
| stop: at most 4 non-empty strings of at most MAX_STOP_CHARS characters | `InvalidValueError` (422) |
| text: no lone UTF-16 surrogates | `InvalidValueError` (422) |
| a message: at most MAX_MESSAGE_CHARS characters of text | `PayloadTooLargeError` (413) |
| images: at most MAX_IMAGES_PER_REQUEST per request | `PayloadTooLargeError` (413) |

Messages start with the field's name as the door calls it (`max_tokens: ...`, `temperature: ...`), so a client can
tell which field to fix. Image bytes and pixels are checked when the image is decoded (`agent.engine.images`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.config import Settings
from agent.engine.errors import InvalidValueError, PayloadTooLargeError
from agent.engine.images import ImageLimits
from agent.engine.structured.schema import SchemaLimits
from agent.engine.types import SamplingParams

MAX_STOPS = 4  # as OpenAI's `stop`
TEMPERATURE_RANGE = (0.0, 2.0)  # inclusive at both ends; 0 = greedy
TOP_P_RANGE = (0.0, 1.0)  # (low, high]: 0 would keep no token
SEED_RANGE = (0, 2**63 - 1)  # inclusive; every engine's generator takes an unsigned 64-bit seed


@dataclass(frozen=True)
class RequestLimits:
    """The configurable limits and defaults of a request; `from_settings` builds them from the env vars."""

    image: ImageLimits = field(default_factory=ImageLimits)
    max_images: int = 4
    max_message_chars: int = 32_000
    max_new_tokens: int = 512
    default_temperature: float = 0.7
    default_top_p: float = 0.9
    max_stop_chars: int = 256
    max_stops: int = MAX_STOPS
    schema: SchemaLimits = field(default_factory=SchemaLimits)  # structured output (agent.engine.structured)

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        """The limits of MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGES_PER_REQUEST, MAX_MESSAGE_CHARS, MAX_NEW_TOKENS,
        TEMPERATURE, TOP_P and MAX_STOP_CHARS."""
        return cls(
            image=ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
            max_images=settings.max_images_per_request,
            max_message_chars=settings.max_message_chars,
            max_new_tokens=settings.max_new_tokens,
            default_temperature=settings.temperature,
            default_top_p=settings.top_p,
            max_stop_chars=settings.max_stop_chars,
            schema=SchemaLimits(settings.max_schema_bytes, settings.max_schema_depth, settings.max_schema_enum),
        )


# ------------------------------------------------------------------------------------------------------ sampling
def check_max_tokens(value: int | None, limits: RequestLimits, name: str = "max_tokens") -> int:
    """Tokens to generate: 1 .. MAX_NEW_TOKENS; None -> MAX_NEW_TOKENS. Over the limit is an error, never capped."""
    if value is None:
        return limits.max_new_tokens
    if value < 1:
        raise InvalidValueError(f"{name}: must be at least 1, got {value}")
    if value > limits.max_new_tokens:
        raise InvalidValueError(f"{name}: {value} is more than MAX_NEW_TOKENS={limits.max_new_tokens}")
    return value


def check_temperature(value: float | None, limits: RequestLimits, name: str = "temperature") -> float:
    """Temperature within [0, 2]; None -> TEMPERATURE."""
    if value is None:
        return limits.default_temperature
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:  # also refuses NaN
        raise InvalidValueError(f"{name}: must be within [{low:g}, {high:g}], got {value:g}")
    return value


def check_top_p(value: float | None, limits: RequestLimits, name: str = "top_p") -> float:
    """top_p within (0, 1]; None -> TOP_P."""
    if value is None:
        return limits.default_top_p
    low, high = TOP_P_RANGE
    if not low < value <= high:  # also refuses NaN
        raise InvalidValueError(f"{name}: must be within ({low:g}, {high:g}], got {value:g}")
    return value


def check_seed(value: int | None, name: str = "seed") -> int | None:
    """A seed within [0, 2**63-1], or None (no seed)."""
    low, high = SEED_RANGE
    if value is not None and not low <= value <= high:
        raise InvalidValueError(f"{name}: must be within [{low}, 2**63-1], got {value}")
    return value


def check_stops(stops: Sequence[str], limits: RequestLimits, name: str = "stop") -> tuple[str, ...]:
    """At most `max_stops` stop strings, none empty, none longer than MAX_STOP_CHARS."""
    if len(stops) > limits.max_stops:
        raise InvalidValueError(f"{name}: {len(stops)} stop sequences, more than {limits.max_stops}")
    if any(not s for s in stops):
        raise InvalidValueError(f"{name}: stop sequences must not be empty")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_chars:
        raise InvalidValueError(
            f"{name}: a stop sequence of {longest} characters, more than MAX_STOP_CHARS={limits.max_stop_chars}"
        )
    return tuple(stops)


def sampling_params(
    limits: RequestLimits,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    max_tokens_name: str = "max_tokens",
) -> SamplingParams:
    """A request's sampling values (None = not sent) checked against the rules, defaults filled in.

    `max_tokens_name` is how the door calls the field in error messages (`max_tokens`, `max_new_tokens`,
    `max_completion_tokens`). Raises `InvalidValueError` (422).
    """
    return SamplingParams(
        max_new_tokens=check_max_tokens(max_tokens, limits, max_tokens_name),
        temperature=check_temperature(temperature, limits),
        top_p=check_top_p(top_p, limits),
        seed=check_seed(seed),
        stop=check_stops(stop, limits),
        ignore_eos=ignore_eos,
    )


# ------------------------------------------------------------------------------------------------------ content
def unicode_problem(text: str) -> str | None:
    """What makes `text` unusable, or None: lone UTF-16 surrogates (JSON allows `"\\ud800"`) cannot be stored,
    tokenized or sent back as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"invalid Unicode (a lone surrogate at character {exc.start})"
    return None


def check_unicode(text: str, name: str = "messages") -> str:
    """Refuse text with lone UTF-16 surrogates (422)."""
    problem = unicode_problem(text)
    if problem is not None:
        raise InvalidValueError(f"{name}: {problem}")
    return text


def check_message_chars(chars: int, limits: RequestLimits, name: str = "messages") -> None:
    """One message's text: at most MAX_MESSAGE_CHARS characters (413 beyond)."""
    if chars > limits.max_message_chars:
        raise PayloadTooLargeError(
            f"{name}: {chars} characters in one message, more than MAX_MESSAGE_CHARS={limits.max_message_chars}"
        )


def check_image_count(count: int, limits: RequestLimits, name: str = "messages") -> None:
    """Images in one request: at most MAX_IMAGES_PER_REQUEST (413 beyond)."""
    if count > limits.max_images:
        raise PayloadTooLargeError(f"{name}: {count} images, more than MAX_IMAGES_PER_REQUEST={limits.max_images}")
