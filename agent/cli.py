"""`dsa-agent`: one command, sub-commands implemented in the modules that own them (imported lazily)."""

from __future__ import annotations

import importlib
import sys

# name -> (module:function, help). Each function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("agent.serving.model_server:main", "start the FastAPI door (:8000)"),
    "triton": ("agent.serving.triton.launcher:main", "start the Triton door (:8001 HTTP, :8002 gRPC, :8003 metrics)"),
    "up": ("agent.serving.stack:main", "start Triton and FastAPI (gateway mode) together: what `make run` does"),
    "chat": ("agent.client.chat_cli:main", "interactive terminal chat against either door"),
    "prepare": ("agent.serving.prepare:main", "one-time set-up: convert the embedded model, prepare Triton"),
    "config": ("agent.serving.prepare:print_config", "print every environment variable with its value and meaning"),
    "bench": ("bench.__main__:main", "run the benchmark (same as `make bench`)"),
}


def _usage() -> str:
    lines = ["usage: dsa-agent COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dsa-agent: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
