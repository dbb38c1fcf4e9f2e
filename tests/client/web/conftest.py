"""Browser fixtures: Debian's Chromium driven by Playwright, and the real FastAPI app served on a free port.

Everything runs on pytest-asyncio's session event loop: the uvicorn server, Playwright's async API and the session
engines (`smollm_engine`, `tiny_vl_engine`) share it, so the engine started by tests/conftest.py serves the page.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright
from web_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, DESKTOP, STATIC

from agent.config import Settings, load_settings


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the session (Debian's package; `playwright install` is never used)."""
    if not CHROMIUM.exists():
        pytest.fail("Chromium missing: run agent/client/web/install-browser.sh (make test does)")
    if not (STATIC / "vendor" / "marked.umd.js").exists():
        pytest.fail("web UI libraries not vendored: run agent/client/web/build.sh (make install does)")
    shutil.rmtree(ARTIFACTS / "failures", ignore_errors=True)  # only this run's failures are left there
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


class PageErrors(list[str]):
    """Uncaught exceptions raised by the page's scripts (a test fails if any occur)."""


@pytest.fixture
async def new_page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await new_page(url, viewport=..., color_scheme=..., **context_options)` opens the chat page.

    Each page gets its own browser context, so its own storage (its own remembered chat). Uncaught script errors
    fail the test; a failing test leaves a screenshot in test-artifacts/web/failures/.
    """
    contexts = []
    pages: list[tuple[Page, PageErrors]] = []

    async def open_page(
        url: str, *, viewport: dict[str, int] = DESKTOP, color_scheme: str = "light", **options: Any
    ) -> Page:
        context = await browser.new_context(viewport=viewport, color_scheme=color_scheme, **options)
        contexts.append(context)
        page = await context.new_page()
        errors = PageErrors()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        pages.append((page, errors))
        await page.goto(url)
        await page.wait_for_selector("body.ready")  # status polled, sessions listed, history shown
        return page

    yield open_page

    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        failures = ARTIFACTS / "failures"
        failures.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        for i, (page, _) in enumerate(pages):
            with contextlib.suppress(Exception):  # best effort: a crashed page must not mask the test's own failure
                await page.screenshot(path=str(failures / f"{name}-{i}.png"), full_page=True)
    for context in contexts:
        await context.close()
    uncaught = [e for _, errors in pages for e in errors]
    assert not uncaught, f"uncaught errors in the page: {uncaught}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Keep each phase's report on the test item so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def app_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Factory of settings for one test's server: its own history database, short greedy answers by default."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "history_db": tmp_path / "history.sqlite3",
            "max_new_tokens": 24,
            "temperature": 0.0,
            **overrides,
        }
        return load_settings(**values)

    return make
