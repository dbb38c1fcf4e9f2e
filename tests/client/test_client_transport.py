"""Transport behaviour without a model: a server that is down, a server that never answers, bad input caught
before any request. Real sockets, real tritonclient/httpx stacks; nothing is mocked."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client.errors import InvalidInputError, RequestTimeoutError, ServerUnavailableError
from agent.client.rest_client import RestClient
from agent.client.triton_client import TritonGrpcClient, TritonHttpClient

REPO = Path(__file__).resolve().parents[2]
CLIENTS = [TritonHttpClient, TritonGrpcClient, RestClient]


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound once to get a free number, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A listening socket that accepts connections (in the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s


@pytest.mark.parametrize("cls", CLIENTS, ids=lambda c: c.__name__)
def test_server_down_raises_server_unavailable_at_once(cls: type, closed_port: int) -> None:
    client = cls(f"127.0.0.1:{closed_port}", timeout=5)
    started = time.monotonic()
    assert client.check_health() is False
    with pytest.raises(ServerUnavailableError):
        client.chat("hello?")
    assert time.monotonic() - started < 5
    client.close()


@pytest.mark.parametrize("cls", CLIENTS, ids=lambda c: c.__name__)
def test_silent_server_raises_timeout_within_the_timeout(cls: type, silent_server: socket.socket) -> None:
    port = silent_server.getsockname()[1]
    client = cls(f"127.0.0.1:{port}", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        client.chat("hello?")
    assert 0.9 < time.monotonic() - started < 4
    assert client.check_health() is False
    client.close()


@pytest.mark.parametrize("cls", CLIENTS, ids=lambda c: c.__name__)
def test_bad_image_path_fails_before_any_request(cls: type, silent_server: socket.socket) -> None:
    port = silent_server.getsockname()[1]
    client = cls(f"127.0.0.1:{port}", timeout=1.0)
    with pytest.raises(InvalidInputError, match="no such file: /no/such/screenshot.png"):
        client.chat("what is in this picture?", image="/no/such/screenshot.png")
    with pytest.raises(InvalidInputError, match="message"):
        client.chat("   ")
    silent_server.settimeout(0.2)
    with pytest.raises(TimeoutError):  # nobody connected: the request was never sent
        silent_server.accept()
    client.close()


@pytest.mark.parametrize("cls", CLIENTS, ids=lambda c: c.__name__)
def test_unknown_sampling_arguments_are_refused(cls: type, closed_port: int) -> None:
    with pytest.raises(TypeError):
        cls(f"127.0.0.1:{closed_port}").chat("hi", temprature=0.1)


@pytest.mark.parametrize("cls", [TritonHttpClient, TritonGrpcClient], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "sampling", [{"max_new_tokens": "10"}, {"max_new_tokens": 2.5}, {"seed": True}, {"temperature": "hot"}]
)
def test_mistyped_sampling_fails_before_any_request(cls: type, sampling: dict, silent_server: socket.socket) -> None:
    client = cls(f"127.0.0.1:{silent_server.getsockname()[1]}", timeout=1.0)
    with pytest.raises(InvalidInputError, match=next(iter(sampling)).replace("max_new_tokens", "max_tokens")):
        client.chat("hi", **sampling)
    silent_server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        silent_server.accept()


def test_demo_script_runs_as_a_script_and_reports_a_missing_server(closed_port: int) -> None:
    # The seed runs `python agent/client/triton_client.py`: `agent` must be importable without installing.
    proc = subprocess.run(
        [sys.executable, "agent/client/triton_client.py", "--url", f"127.0.0.1:{closed_port}", "--timeout", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},  # no PYTHONPATH: the script must find `agent` itself
    )
    assert proc.returncode == 1, proc.stderr
    assert "is not ready" in proc.stderr and "Traceback" not in proc.stderr
