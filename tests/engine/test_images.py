"""Image decoding at the edge: base64 / data URLs, size limits before decoding, clear 4xx errors."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from agent.engine.errors import InvalidRequestError, PayloadTooLargeError
from agent.engine.images import (
    ImageLimits,
    b64_to_bytes,
    check_aspect_ratio,
    data_url,
    decode_b64_image,
    decode_image,
    encode_png_b64,
    image_part,
)
from agent.engine.types import ImagePart

LIMITS = ImageLimits(max_bytes=1024 * 1024, max_pixels=4096 * 4096)


def png_bytes(size: tuple[int, int] = (8, 6), mode: str = "RGB", color: object = "red") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_plain_base64_and_data_url_decode_to_the_same_bytes() -> None:
    raw = png_bytes()
    b64 = base64.b64encode(raw).decode()
    assert b64_to_bytes(b64, LIMITS) == raw
    assert b64_to_bytes(f"data:image/png;base64,{b64}", LIMITS) == raw
    assert b64_to_bytes(b64[:10] + "\n" + b64[10:], LIMITS) == raw  # line-wrapped base64 is common


def test_data_url_with_surrounding_whitespace() -> None:
    raw = png_bytes()
    url = "  data:image/png;base64," + base64.b64encode(raw).decode() + "\n"
    assert b64_to_bytes(url, LIMITS) == raw


@pytest.mark.parametrize("bad", ["", "   ", "not base64!!", "data:image/png,rawdata", "data:image/png;base64"])
def test_malformed_input_is_400(bad: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        b64_to_bytes(bad, LIMITS)
    assert err.value.status == 400 and err.value.message.startswith("image:")


def test_oversized_base64_is_413_before_decoding() -> None:
    small = ImageLimits(max_bytes=1024, max_pixels=LIMITS.max_pixels)
    with pytest.raises(PayloadTooLargeError) as err:
        b64_to_bytes("A" * 8000, small)
    assert err.value.status == 413 and "MAX_IMAGE_BYTES" in err.value.message


def test_decode_gives_rgb_of_the_right_size() -> None:
    img = decode_image(png_bytes((8, 6), "RGBA", (0, 0, 255, 128)), LIMITS)
    assert img.mode == "RGB" and img.size == (8, 6)
    gray = decode_b64_image(base64.b64encode(png_bytes((5, 5), "L", 128)).decode(), LIMITS)
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (128, 128, 128)


def test_too_many_pixels_is_413() -> None:
    tight = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=100)
    with pytest.raises(PayloadTooLargeError) as err:
        decode_image(png_bytes((20, 20)), tight)
    assert "MAX_IMAGE_PIXELS" in err.value.message


def test_decompression_bomb_is_413_not_500() -> None:
    # A tiny file that claims a huge canvas: refused from the header, never decoded.
    bomb = png_bytes((20000, 20000), "1", 0)
    assert len(bomb) < 100_000
    with pytest.raises(PayloadTooLargeError):
        decode_image(bomb, ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=10**12))


def test_too_many_bytes_is_413() -> None:
    with pytest.raises(PayloadTooLargeError):
        decode_image(b"\x00" * 2048, ImageLimits(max_bytes=1024, max_pixels=100))


@pytest.mark.parametrize("raw", [b"GIF89a-truncated", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"hello world"])
def test_unreadable_bytes_are_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError) as err:
        decode_image(raw, LIMITS)
    assert err.value.status == 400


def test_png_round_trip() -> None:
    img = Image.new("RGB", (7, 3), (1, 2, 3))
    back = decode_b64_image(encode_png_b64(img), LIMITS)
    assert back.size == (7, 3) and back.getpixel((6, 2)) == (1, 2, 3)


def test_an_image_part_keeps_the_file_as_sent() -> None:
    raw = png_bytes(mode="RGBA", color=(9, 8, 7, 255))
    b64 = base64.b64encode(raw).decode()
    part = image_part(b64, LIMITS)
    assert (part.source, part.mime, part.image.mode) == (raw, "image/png", "RGB")
    assert data_url(part) == f"data:image/png;base64,{b64}"  # forwarded as sent, not re-encoded
    made_here = ImagePart(Image.new("RGB", (2, 2), (4, 5, 6)))
    assert decode_b64_image(data_url(made_here), LIMITS).getpixel((1, 1)) == (4, 5, 6)  # no file: a lossless PNG
    with pytest.raises(PayloadTooLargeError):
        image_part(b64, ImageLimits(max_bytes=1024 * 1024, max_pixels=10))  # still checked


@pytest.mark.parametrize(
    ("size", "refused"), [((3200, 16), False), ((16, 3200), False), ((3201, 16), True), ((1, 201), True)]
)
def test_aspect_ratio(size: tuple[int, int], refused: bool) -> None:
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", size)]
    if refused:
        with pytest.raises(InvalidRequestError, match=f"{size[0]}x{size[1]} pixels.*up to 200:1"):
            check_aspect_ratio(images)
    else:
        check_aspect_ratio(images)
