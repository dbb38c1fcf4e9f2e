"""Decode and size-check images once, at the edge (base64, data URLs, raw bytes), with explicit limits."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from agent.engine.errors import InvalidRequestError, PayloadTooLargeError
from agent.engine.types import ImagePart

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


# Qwen2/3-VL's image processors (smart_resize) refuse an image whose long side is more than 200 times its short
# side; a model's own limit, not a setting: every engine serving these models checks it before preprocessing, so a
# thin strip is a 400 naming the ratio on each of them (never the processor's bare ValueError, a 500).
MAX_ASPECT_RATIO = 200


def check_aspect_ratio(images: list[Image.Image], limit: int = MAX_ASPECT_RATIO) -> None:
    """InvalidRequestError (400) for an image longer or thinner than `limit`:1."""
    for image in images:
        width, height = image.size
        if max(width, height) > limit * max(min(width, height), 1):
            raise InvalidRequestError(
                f"image: {width}x{height} pixels is more than {limit} times as long as it is wide; this vision "
                f"model takes aspect ratios up to {limit}:1 (crop or pad the image)"
            )


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000


def b64_to_bytes(data: str, limits: ImageLimits) -> bytes:
    """Base64 (plain or a data URL) -> bytes, refusing oversized input before decoding it."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidRequestError("image: expected a non-empty base64 string or data URL")
    data = data.strip()
    match = _DATA_URL.match(data)
    if data.startswith("data:"):
        if not match or not match.group("b64"):
            raise InvalidRequestError("image: data URL must be base64-encoded (data:image/png;base64,...)")
        data = match.group("data")
    if len(data) * 3 // 4 > limits.max_bytes:
        raise PayloadTooLargeError(f"image: larger than MAX_IMAGE_BYTES={limits.max_bytes} bytes")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("image: invalid base64") from None


def decode_image(raw: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes -> RGB PIL image. Checks size in bytes and in pixels (from the header, before decoding pixels)."""
    return _open_checked(raw, limits).convert("RGB")


def _open_checked(raw: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes -> the loaded image in its own mode and format, after the byte and pixel checks."""
    if len(raw) > limits.max_bytes:
        raise PayloadTooLargeError(f"image: {len(raw)} bytes, more than MAX_IMAGE_BYTES={limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise PayloadTooLargeError(
                    f"image: {width}x{height} pixels, more than MAX_IMAGE_PIXELS={limits.max_pixels}"
                )
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLargeError(f"image: more pixels than MAX_IMAGE_PIXELS={limits.max_pixels}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequestError(f"image: not a readable image ({type(exc).__name__})") from None
    return img


def decode_b64_image(data: str, limits: ImageLimits) -> Image.Image:
    """Base64 or a data URL -> a checked RGB PIL image."""
    return decode_image(b64_to_bytes(data, limits), limits)


def image_part(data: str, limits: ImageLimits) -> ImagePart:
    """Base64 or a data URL -> a checked, decoded `ImagePart` that keeps the file as sent (`source`, `mime`), so the
    Triton gateway forwards those bytes rather than re-encoding the pixels."""
    raw = b64_to_bytes(data, limits)
    img = _open_checked(raw, limits)
    mime = img.get_format_mimetype() or "application/octet-stream"
    return ImagePart(img.convert("RGB"), source=raw, mime=mime)


def data_url(part: ImagePart) -> str:
    """An image part as a base64 data URL: its original file when it has one, else a lossless PNG of its pixels."""
    if part.source is not None:
        return f"data:{part.mime};base64," + base64.b64encode(part.source).decode("ascii")
    return "data:image/png;base64," + encode_png_b64(part.image)


def encode_png_b64(img: Image.Image) -> str:
    """PIL image -> base64 PNG (used by the gateway engine and clients)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
