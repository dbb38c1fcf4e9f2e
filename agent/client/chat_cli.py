"""`dsa-agent chat`: an interactive terminal chat against either door, with streamed answers.

    dsa-agent chat                                   # FastAPI door, http://localhost:8000
    dsa-agent chat --door triton-grpc                # Triton gRPC, localhost:8002
    dsa-agent chat --door triton-http --url host:8001

Commands: `/image PATH` attaches an image to the next message, `/clear` forgets the conversation, `/history` shows
it, `/quit` leaves. Ctrl-C while an answer streams stops that answer (the request is cancelled on the server) and
returns to the prompt; Ctrl-C or Ctrl-D at the prompt leaves. The CLI installs its own Ctrl-C handling, so this holds
even when it is started with SIGINT ignored (`nohup`, a background job of a non-interactive shell, some CI runners).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from agent.client.conversation import ChatStream, ImageInput, Turn, encode_image
from agent.client.errors import DsaClientError

DOORS = ("fastapi", "triton-http", "triton-grpc")
DEFAULT_URLS = {"fastapi": "http://localhost:8000", "triton-http": "localhost:8001", "triton-grpc": "localhost:8002"}
HELP = "commands: /image PATH (attach to next message), /clear, /history, /help, /quit  —  Ctrl-C stops an answer"


class ChatClient(Protocol):
    """What the REPL needs from a client (RestClient, TritonHttpClient and TritonGrpcClient all have it)."""

    url: str

    def check_health(self) -> bool: ...
    def stream_chat(self, message: str, image: ImageInput | None = None, **sampling: Any) -> ChatStream: ...
    def clear_history(self) -> None: ...
    @property
    def history(self) -> list[Turn]: ...
    def close(self) -> None: ...


def make_client(
    door: str, url: str | None, timeout: float, model: str | None = None, session: str | None = None
) -> ChatClient:
    """The client for a door (imported lazily: the Triton clients pull in tritonclient, gevent and grpc)."""
    url = url or DEFAULT_URLS[door]
    if door == "fastapi":
        from agent.client.rest_client import RestClient

        return RestClient(url, timeout=timeout, session_id=session)
    from agent.client.triton_client import TritonGrpcClient, TritonHttpClient

    cls = TritonGrpcClient if door == "triton-grpc" else TritonHttpClient
    return cls(url, timeout=timeout, model_name=model)


class ChatRepl:
    """The read-eval-print loop, independent of the terminal so tests can drive it with plain streams."""

    def __init__(
        self,
        client: ChatClient,
        *,
        sampling: dict[str, Any] | None = None,
        read: Callable[[str], str] = input,
        out: TextIO = sys.stdout,
    ) -> None:
        self.client = client
        self.sampling = sampling or {}
        self.read = read
        self.out = out
        self.pending_image: str | None = None

    def run(self) -> int:
        """Loop until /quit, Ctrl-D or Ctrl-C at the prompt; returns the exit code."""
        self._say(f"connected to {self.client.url}. {HELP}")
        while True:
            try:
                line = self.read("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                self._say("")
                return 0
            if not line:
                continue
            if line.startswith("/"):
                if self._command(line) == "quit":
                    return 0
                continue
            self._ask(line)

    def _command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/clear":
            self._guarded(self.client.clear_history)
            self._say("(conversation cleared)")
        elif name == "/history":
            self._guarded(self._show_history)
        elif name == "/image":
            self._attach(arg.strip())
        else:
            self._say(HELP)
        return None

    def _attach(self, path: str) -> None:
        if not path:
            self._say("usage: /image PATH")
            return
        try:
            self.pending_image = encode_image(path)  # checked now, not when the message is sent
        except DsaClientError as exc:
            self._say(f"error: {exc}")
            return
        self._say(f"(image {path} attached to your next message)")

    def _show_history(self) -> None:
        turns = self.client.history
        if not turns:
            self._say("(no history)")
        for turn in turns:
            self._say(f"{turn.role}: {turn.content}{'  [image]' if turn.has_image else ''}")

    def _ask(self, message: str) -> None:
        image, self.pending_image = self.pending_image, None
        try:
            stream = self.client.stream_chat(message, image=image, **self.sampling)
        except DsaClientError as exc:
            self._say(f"error: {exc}")
            return
        self.out.write("bot> ")
        self.out.flush()
        try:
            for delta in stream:
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            stream.close()  # cancels the generation on the server
            self._say("\n(stopped)")
            return
        except DsaClientError as exc:
            self._say(f"\nerror: {exc}")
            return
        result = stream.result
        stats = f"  [{result.completion_tokens} tokens, {result.seconds:.2f}s]" if result else ""
        self._say(stats)

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except DsaClientError as exc:
            self._say(f"error: {exc}")

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsa-agent chat", description="Interactive chat against either door.")
    p.add_argument("--door", choices=DOORS, default="fastapi", help="which server to talk to (default fastapi)")
    p.add_argument("--url", default=None, help="server address (default: the door's localhost port)")
    p.add_argument("--model", default=None, help="Triton model name (default TRITON_MODEL_NAME or qwen3-vl)")
    p.add_argument("--session", default=None, help="FastAPI session to continue (default: start a new one)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each piece of an answer")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(list(argv))


def take_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt here, whatever SIGINT disposition this process inherited.

    Python installs its KeyboardInterrupt handler at start-up only when SIGINT is at its default; a process started
    with SIGINT ignored (nohup, `cmd &` in a script, CI runners) would otherwise never see Ctrl-C, and a stream could
    not be stopped. Signal handlers can be set from the main thread only, so elsewhere (an embedding app) this is a
    no-op."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dsa-agent chat`."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    take_ctrl_c()
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    client = make_client(args.door, args.url, args.timeout, args.model, args.session)
    sampling = {
        k: v
        for k, v in (
            ("max_new_tokens", args.max_new_tokens),
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("seed", args.seed),
        )
        if v is not None
    }
    try:
        if not client.check_health():
            print(f"warning: {client.url} is not ready (is the server running?)", file=sys.stderr)
        elif args.door == "fastapi" and not args.session:
            _start_session(client)
        return ChatRepl(client, sampling=sampling).run()
    finally:
        client.close()


def _start_session(client: Any) -> None:
    """A fresh server-side conversation, so /clear never touches another user's default session."""
    try:
        client.new_session()
    except DsaClientError as exc:
        print(f"warning: cannot start a session ({exc}); using the server's default session", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
