"""RestClient and `dsa-agent chat --door fastapi` against the real FastAPI app (uvicorn on a free port).

The app serves the deterministic FakeEngine (it answers "echo: <message>" word by word), so these tests check the
client's wire handling — sessions, SSE streaming, cancellation, images, errors — fast; the Triton tests cover a
real model. The seed's `requests` example runs as written in the guide, with the port number substituted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from agent.client.errors import InvalidInputError, PayloadTooLargeError
from agent.client.rest_client import RestClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

SEED_REQUESTS = """
import requests

response = requests.post(
    "http://localhost:8000/chat",
    json={
        "message": "What are algorithms?",
        "image_base64": None
    }
)
print(response.json())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fastapi_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    from agent.config import load_settings
    from agent.engine.fake import FakeEngine
    from agent.serving.model_server import create_app

    settings = load_settings(history_db=tmp_path_factory.mktemp("rest") / "history.sqlite3", max_message_chars=2000)
    engine = FakeEngine(supports_images=True, step_delay=0.02)
    asyncio.run(engine.start())
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, engine=engine), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://localhost:{port}"
    server.should_exit = True
    thread.join(10)


def test_seed_requests_example(fastapi_url: str) -> None:
    port = fastapi_url.rsplit(":", 1)[1]
    code = SEED_REQUESTS.replace("localhost:8000", f"localhost:{port}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<seed snippet>", "exec"), {"__name__": "seed_snippet"})
    assert "'response': 'echo: What are algorithms?'" in out.getvalue()


def test_chat_stream_history_and_sessions(fastapi_url: str) -> None:
    with RestClient(fastapi_url, timeout=30) as client:
        assert client.check_health()
        assert client.model_info().engine == "fake"
        session = client.new_session()
        text, seconds = client.chat("What is a heap?")
        assert text == "echo: What is a heap?" and seconds > 0
        stream = client.stream_chat("And a binary heap?")
        deltas = list(stream)
        assert len(deltas) > 3 and "".join(deltas) == "echo: And a binary heap?"
        assert stream.result is not None and stream.result.finish_reason == "stop"
        history = client.history
        assert [t.content for t in history] == ["What is a heap?", text, "And a binary heap?", "".join(deltas)]
        with RestClient(fastapi_url) as other:  # another session does not see this conversation
            other.new_session()
            assert other.history == []
        client.clear_history()
        assert client.history == [] and client.session_id == session


def test_images_and_errors(fastapi_url: str, tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    Image.new("RGB", (16, 16), "gray").save(path)
    with RestClient(fastapi_url, timeout=30) as client:
        client.new_session()
        text, _ = client.chat("Describe it.", image=path)
        assert text == "echo: Describe it. [1 images]"
        assert client.history[0].has_image
        with pytest.raises(InvalidInputError, match="no such file"):
            client.chat("Describe it.", image="/no/such/cat.png")
        with pytest.raises(PayloadTooLargeError) as info:
            client.chat("x" * 2001)
        assert info.value.status == 413 and "MAX_MESSAGE_CHARS" in str(info.value)


def test_cancelled_stream(fastapi_url: str) -> None:
    with RestClient(fastapi_url, timeout=30) as client:
        client.new_session()
        stream = client.stream_chat(" ".join(f"w{i}" for i in range(300)))
        deltas = iter(stream)
        assert next(deltas) == "echo:"
        started = time.monotonic()
        stream.close()
        assert time.monotonic() - started < 2 and stream.result is None
        assert client.chat("still there?")[0] == "echo: still there?"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("inherited_sigint", ["default", "ignored"])
def test_chat_cli_over_fastapi_survives_ctrl_c(fastapi_url: str, inherited_sigint: str) -> None:
    """Ctrl-C stops a streaming answer, also when the CLI was started with SIGINT ignored (as CI runners do)."""
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        ["-m", "agent.cli", "chat", "--door", "fastapi", "--url", fastapi_url],
        cwd=str(REPO),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 400),
        preexec_fn=_ignore_sigint if inherited_sigint == "ignored" else None,
    )
    try:
        child.expect_exact("you> ")
        child.sendline(" ".join(f"w{i}" for i in range(300)))  # 300 words at 20 ms each: ~6 s of streaming
        child.expect_exact("bot> echo: w0 w1")
        child.sendintr()
        child.expect_exact("(stopped)")
        child.expect_exact("you> ")
        child.sendline("hello again")
        child.expect_exact("bot> echo: hello again")
        child.expect(r"\[\d+ tokens, ")
        child.expect_exact("you> ")
        child.sendline("/history")
        child.expect_exact("you> ")
        # The CLI chats in its own fresh session: the seed example's turns (default session) are not in it.
        assert "user: hello again" in child.before and "assistant: echo: hello again" in child.before
        assert "What are algorithms?" not in child.before
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)
