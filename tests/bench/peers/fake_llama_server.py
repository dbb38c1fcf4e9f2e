"""A stand-in for the llama-server binary in tests: records its command line, then serves the FastAPI door over the
deterministic FakeEngine on the --port it was given (the OpenAI routes and /health the bench uses)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import uvicorn

from agent.config import load_settings
from agent.engine.fake import FakeEngine
from agent.serving.model_server import create_app


async def main(argv: list[str]) -> None:
    with open(os.environ["FAKE_LLAMA_ARGV_LOG"], "a") as out:
        out.write(json.dumps(argv) + "\n")
    port = int(argv[argv.index("--port") + 1])
    engine = FakeEngine(model_name="llama-server")  # the name the bench sends; the real one ignores it
    await engine.start()
    history = Path(tempfile.mkdtemp()) / "h.sqlite3"
    app = create_app(load_settings(history_db=history), engine)
    await uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).serve()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
