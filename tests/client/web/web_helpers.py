"""Helpers of the web UI tests: where things are, how Chromium starts, the real app on a free port, page actions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from PIL import Image
from playwright.async_api import Page, expect

from agent.config import Settings
from agent.engine.base import Engine
from agent.serving.api.engine_runner import Loader

REPO = Path(__file__).resolve().parents[3]
STATIC = REPO / "agent" / "client" / "web" / "static"
ARTIFACTS = REPO / "test-artifacts" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces we do not have
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}


@contextlib.asynccontextmanager
async def serve_app(engine: Engine | None, settings: Settings, *, loader: Loader | None = None) -> AsyncIterator[str]:
    """The real FastAPI app on a free 127.0.0.1 port; yields its URL.

    `engine`: an already started engine (never shut down by the app); or None and `loader` loads one at start-up.
    """
    from agent.serving.model_server import create_app

    app = create_app(settings=settings, engine=engine, loader=loader)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()  # start-up failed: raise its error
                    raise RuntimeError("uvicorn exited during start-up")
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def ask(page: Page, text: str) -> None:
    """Type a message and press Enter; wait until the answer is complete (no longer busy)."""
    box = page.get_by_role("textbox", name="Message")
    await box.fill(text)
    await box.press("Enter")
    answers = page.get_by_role("article", name="Assistant message")
    await expect(answers.last).to_have_attribute("aria-busy", "false", timeout=120_000)


def png_b64(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> str:
    """A plain-colour PNG, base64-encoded."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# Hands the page an image file the way a learner would: a clipboard paste or a drag-and-drop onto the composer.
PASTE_JS = """([b64, how]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const file = new File([bytes], "shot.png", { type: "image/png" });
  const dt = new DataTransfer();
  dt.items.add(file);
  const target = document.getElementById("input");
  if (how === "paste") target.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true }));
  else for (const type of ["dragenter", "dragover", "drop"])
    target.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
}"""
