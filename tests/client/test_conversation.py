"""Client-side conversation bounding, image coercion and answer streams (no server needed)."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from agent.client.conversation import ChatStream, Conversation, Piece, default_max_history, encode_image
from agent.client.errors import InvalidInputError


def test_conversation_keeps_the_last_max_turns_pairs() -> None:
    conv = Conversation(max_turns=2)
    for i in range(5):
        conv.add_exchange(f"q{i}", f"a{i}")
    assert [t.content for t in conv.snapshot()] == ["q3", "a3", "q4", "a4"]
    assert [t.role for t in conv.snapshot()] == ["user", "assistant", "user", "assistant"]
    conv.clear()
    assert conv.snapshot() == [] and len(conv) == 0


def test_zero_turns_keeps_nothing() -> None:
    conv = Conversation(max_turns=0)
    conv.add_exchange("q", "a")
    assert conv.snapshot() == []


def test_max_history_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_HISTORY", "3")
    assert default_max_history() == 3 and Conversation().max_turns == 3
    monkeypatch.setenv("MAX_HISTORY", "lots")
    assert default_max_history() == 5
    monkeypatch.delenv("MAX_HISTORY")
    assert default_max_history() == 5


def test_concurrent_exchanges_never_split_a_turn() -> None:
    conv = Conversation(max_turns=1000)

    def worker(n: int) -> None:
        for i in range(200):
            conv.add_exchange(f"q{n}.{i}", f"a{n}.{i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    turns = conv.snapshot()
    assert len(turns) == 1600
    for user, answer in zip(turns[::2], turns[1::2], strict=True):
        assert user.role == "user" and answer.role == "assistant"
        assert answer.content == "a" + user.content[1:]


def _png_bytes(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def _decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def test_every_image_form_encodes_to_the_same_picture(tmp_path: Path) -> None:
    raw = _png_bytes()
    path = tmp_path / "red.png"
    path.write_bytes(raw)
    b64 = base64.b64encode(raw).decode()
    forms = [str(path), path, raw, Image.open(io.BytesIO(raw)), b64, f"data:image/png;base64,{b64}"]
    for form in forms:
        img = _decoded(encode_image(form))
        assert img.size == (8, 6) and img.getpixel((0, 0)) == (255, 0, 0), type(form)


def test_jpeg_base64_starting_with_a_slash_is_not_taken_for_a_path() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "blue").save(buf, format="JPEG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    assert b64.startswith("/9j/")
    assert _decoded(encode_image(b64)).size == (16, 16)


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        ("/no/such/dir/cat.png", "no such file: /no/such/dir/cat.png"),
        ("cat.png", "no such file: cat.png"),
        (b"not an image at all", "not a readable image"),
        ("data:image/png,abc", "must be base64"),
        (12345, "unsupported type int"),
    ],
)
def test_bad_images_fail_with_a_clear_message(image: object, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match="image: ") as info:
        encode_image(image)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_a_file_that_is_not_an_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(InvalidInputError, match="not a readable image"):
        encode_image(path)


class _Pieces:
    """A server's responses, recording whether the consumer closed (cancelled) the request."""

    def __init__(self, pieces: list[Piece], fail_after: int | None = None) -> None:
        self.pieces, self.fail_after, self.cancelled = pieces, fail_after, False

    def __call__(self) -> Iterator[Piece]:
        try:
            for n, piece in enumerate(self.pieces):
                if n == self.fail_after:
                    raise KeyboardInterrupt
                yield piece
        except GeneratorExit:
            self.cancelled = True
            raise


def test_stream_yields_deltas_then_records_the_result() -> None:
    source = _Pieces([Piece("Hel", 7, 1), Piece("lo", 7, 2), Piece("", 7, 2, "stop")])
    done = []
    stream = ChatStream(source(), on_complete=done.append)
    assert list(stream) == ["Hel", "lo"]
    assert stream.result is not None and done == [stream.result]
    assert (stream.result.text, stream.result.prompt_tokens, stream.result.completion_tokens) == ("Hello", 7, 2)
    assert stream.result.finish_reason == "stop" and not source.cancelled
    assert list(stream) == [] and done == [stream.result]  # a second pass neither repeats nor re-records


def test_closing_a_stream_early_cancels_it_and_records_nothing() -> None:
    source = _Pieces([Piece("a"), Piece("b"), Piece("c", finish_reason="stop")])
    done = []
    stream = ChatStream(source(), on_complete=done.append)
    deltas = iter(stream)
    assert next(deltas) == "a"
    stream.close()
    assert source.cancelled and done == [] and stream.result is None and stream.text == "a"


def test_ctrl_c_inside_the_stream_propagates_without_a_result() -> None:
    source = _Pieces([Piece("a"), Piece("b")], fail_after=1)
    done = []
    stream = ChatStream(source(), on_complete=done.append)
    with pytest.raises(KeyboardInterrupt):
        list(stream)
    assert done == [] and stream.result is None
