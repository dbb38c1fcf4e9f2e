"""What the clients share: the client-side conversation, answers, answer streams and image coercion.

The Triton model is stateless (it takes the whole conversation as `messages`), so the Triton clients keep the
conversation here, bounded like the server's MAX_HISTORY. Images are checked and encoded *before* any request.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from agent.client.errors import DsaClientError, InvalidInputError

log = logging.getLogger(__name__)

#: What `chat(image=...)` accepts: a file path, raw image bytes, a PIL image, or a base64 string / data URL.
ImageInput = str | os.PathLike[str] | bytes | Image.Image

_DEFAULT_MAX_HISTORY = 5  # the seed's MAX_HISTORY default


def default_max_history() -> int:
    """MAX_HISTORY from the environment (the seed's variable), else 5; a bad value is logged and ignored."""
    raw = os.environ.get("MAX_HISTORY", "").strip()
    if not raw:
        return _DEFAULT_MAX_HISTORY
    try:
        value = int(raw)
        if value < 0:
            raise ValueError(raw)
        return value
    except ValueError:
        log.warning("MAX_HISTORY=%r is not a non-negative integer; using %d", raw, _DEFAULT_MAX_HISTORY)
        return _DEFAULT_MAX_HISTORY


@dataclass(frozen=True)
class Turn:
    """One message of the conversation. Earlier turns are resent as text only (`has_image` remembers an image)."""

    role: Literal["user", "assistant"]
    content: str
    has_image: bool = False

    def to_message(self) -> dict[str, str]:
        """The OpenAI-shaped message the Triton `messages` input takes."""
        return {"role": self.role, "content": self.content}


class Conversation:
    """A thread-safe, bounded conversation: the last `max_turns` user+assistant pairs.

    A turn is recorded only once its answer is complete (`add_exchange`), atomically, so concurrent `chat()` calls
    (the seed's ThreadPoolExecutor example) never interleave half-turns; each request carries the turns that were
    complete when it was sent.
    """

    def __init__(self, max_turns: int | None = None) -> None:
        self.max_turns = default_max_history() if max_turns is None else max_turns
        if self.max_turns < 0:
            raise ValueError("max_turns must be >= 0")
        self._turns: list[Turn] = []
        self._lock = threading.Lock()

    def snapshot(self) -> list[Turn]:
        """A copy of the kept turns, oldest first."""
        with self._lock:
            return list(self._turns)

    def add_exchange(self, user: str, assistant: str, *, has_image: bool = False) -> None:
        """Record one finished question and answer, dropping the oldest pairs beyond `max_turns`."""
        with self._lock:
            self._turns += [Turn("user", user, has_image), Turn("assistant", assistant)]
            keep = 2 * self.max_turns
            del self._turns[: max(0, len(self._turns) - keep)]

    def clear(self) -> None:
        """Forget every turn."""
        with self._lock:
            self._turns.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._turns)


@dataclass(frozen=True)
class ChatResult:
    """A whole answer: its text, wall time in seconds, token counts and why generation stopped."""

    text: str
    seconds: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


@dataclass(frozen=True)
class Piece:
    """One response from a server: a text delta (or the whole text) and running counts; the last has a reason."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class ChatStream:
    """An answer arriving piece by piece: iterate it for text deltas; `result` is set once it is complete.

    `close()` (or leaving a `with` block early, or Ctrl-C while iterating) cancels the request on the server.
    `on_complete` runs once with the full result when the stream ends normally (the client records the turn then).
    """

    def __init__(self, pieces: Iterator[Piece], on_complete: Callable[[ChatResult], None] | None = None) -> None:
        self._pieces = pieces
        self._on_complete = on_complete
        self._parts: list[str] = []
        self._started = time.perf_counter()
        self.result: ChatResult | None = None
        self._iterator: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        # One pass only: iterating again continues (or ends) the same stream rather than re-recording the answer.
        if self._iterator is None:
            self._iterator = self._deltas()
        return self._iterator

    def _deltas(self) -> Iterator[str]:
        last = Piece("")
        try:
            for piece in self._pieces:
                last = piece
                if piece.text:
                    self._parts.append(piece.text)
                    yield piece.text
        except BaseException:
            self.close()  # KeyboardInterrupt or an error: cancel the request on the server
            raise
        self.result = ChatResult(
            text="".join(self._parts),
            seconds=time.perf_counter() - self._started,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason or "stop",
        )
        if self._on_complete is not None:
            self._on_complete(self.result)

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def collect(self) -> ChatResult:
        """Consume the whole stream and return its result."""
        for _ in self:
            pass
        if self.result is None:  # closed before the end (close() or an earlier, interrupted iteration)
            raise DsaClientError("the answer's stream was closed before it ended")
        return self.result

    def close(self) -> None:
        """Stop receiving and cancel the request (the underlying generator's cleanup aborts it)."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_image(image: ImageInput) -> str:
    """Any accepted image form -> base64 of an image file, checked here so a bad image fails before any request.

    A `str` is a path if such a file exists, else a base64 string or `data:` URL; bytes are an image file's bytes.
    """
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    if isinstance(image, bytes | bytearray):
        _check_image_bytes(bytes(image), "image bytes")
        return base64.b64encode(bytes(image)).decode("ascii")
    if isinstance(image, os.PathLike):
        return _encode_file(Path(image))
    if isinstance(image, str):
        return _encode_str(image)
    raise InvalidInputError(f"image: unsupported type {type(image).__name__} (path, bytes, PIL image or base64)")


def _encode_str(text: str) -> str:
    """A string is a data URL, an existing file, or base64; a short string that is none of them is a missing file."""
    data = text.strip()
    if data.startswith("data:"):
        if ";base64," not in data:
            raise InvalidInputError("image: a data URL must be base64 (data:image/png;base64,...)")
        return _encode_b64(data.split(",", 1)[1], "data URL")
    if _is_file(data):
        return _encode_file(Path(data))
    try:
        return _encode_b64(data, "base64 image")
    except InvalidInputError:
        if len(data) < 1024:  # short and undecodable: the caller almost surely meant a file path
            raise InvalidInputError(f"image: no such file: {data} (nor is it a base64 image)") from None
        raise


def _encode_b64(data: str, what: str) -> str:
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"image: {what} is not valid base64 ({_short(data)!r})") from None
    _check_image_bytes(raw, what)
    return base64.b64encode(raw).decode("ascii")


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).expanduser().is_file()
    except OSError:  # e.g. a long base64 string: "File name too long"
        return False


def _encode_file(path: Path) -> str:
    path = path.expanduser()
    if not path.is_file():
        raise InvalidInputError(f"image: no such file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"image: cannot read {path}: {exc.strerror}") from None
    _check_image_bytes(raw, str(path))
    return base64.b64encode(raw).decode("ascii")


def _check_image_bytes(raw: bytes, what: str) -> None:
    """Refuse bytes that are not an image file PIL can identify (reads the header only)."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"image: {what} is not a readable image ({type(exc).__name__})") from None


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
