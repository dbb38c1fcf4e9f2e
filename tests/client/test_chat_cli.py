"""`dsa-agent chat`: Ctrl-C works even when the CLI inherits an ignored SIGINT.

Streaming, stopping an answer and the commands against live servers are in test_rest_live.py (FastAPI) and
test_triton_live.py (Triton); these tests need no server.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path

import pytest

from agent.client import chat_cli

REPO = Path(__file__).resolve().parents[2]


def _ignore_sigint() -> None:
    """Run in the child before exec: what nohup, `cmd &` in a script and some CI runners hand their children."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _unused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_leaves_even_when_sigint_was_ignored() -> None:
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        ["-m", "agent.cli", "chat", "--door", "fastapi", "--url", _unused_url(), "--timeout", "5"],
        cwd=str(REPO),
        encoding="utf-8",
        timeout=60,
        preexec_fn=_ignore_sigint,
    )
    try:
        child.expect_exact("is not ready")  # no server: the REPL starts anyway
        child.expect_exact("you> ")
        child.sendintr()  # Ctrl-C through the terminal; with SIGINT left ignored nothing would happen
        child.expect(pexpect.EOF, timeout=20)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_take_ctrl_c_restores_keyboard_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signal, "signal", _Recorder())  # the test process keeps its own handler
    chat_cli.take_ctrl_c()
    assert signal.signal.calls == [(signal.SIGINT, signal.default_int_handler)]  # type: ignore[attr-defined]

    calls_from_thread = _Recorder()
    monkeypatch.setattr(signal, "signal", calls_from_thread)
    worker = threading.Thread(target=chat_cli.take_ctrl_c)
    worker.start()
    worker.join()
    assert calls_from_thread.calls == []  # only the main thread may set handlers: elsewhere it leaves them alone


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, object]] = []

    def __call__(self, signum: int, handler: object) -> None:
        self.calls.append((signum, handler))
