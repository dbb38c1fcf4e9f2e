"""The chat page end to end with real models: Chromium -> the real FastAPI app -> the session's engines
(transformers; OpenVINO too for a pasted image).

Screenshots (desktop 1280 px and phone 375 px, light and dark) are written to test-artifacts/web/.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, expect
from web_helpers import ARTIFACTS, DESKTOP, PASTE_JS, PHONE, ask, png_b64, serve_app

from agent.engine.types import GenerationRequest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Records the assistant's text each time the page changes it, to prove the answer arrived in pieces.
WATCH_RENDERS_JS = """() => {
  window.__renders = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('article[data-role="assistant"] .msg-body');
    if (answers.length) window.__renders.push(answers[answers.length - 1].textContent);
  }).observe(document.getElementById("messages"), { childList: true, subtree: true, characterData: true });
}"""


async def running(url: str) -> int:
    async with httpx.AsyncClient(base_url=url) as client:
        return (await client.get("health")).json()["running"]


async def history(url: str, session_id: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url) as client:
        return (await client.get("history", params={"session_id": session_id})).json()["history"]


async def current_session(page: Page) -> str:
    return await page.evaluate("localStorage.getItem('newbie-app.session')")


async def test_question_gets_a_streamed_answer_from_the_real_model(smollm_engine, app_settings, new_page) -> None:
    async with serve_app(smollm_engine, app_settings(max_new_tokens=20)) as url:
        page = await new_page(url)
        status = page.get_by_role("status", name="Model status")
        await expect(status).to_contain_text("SmolLM2-135M-Instruct · ready")
        await expect(status).to_contain_text("text only")
        await page.evaluate(WATCH_RENDERS_JS)

        await ask(page, "What is a binary tree?")

        answer = page.get_by_role("article", name="Assistant message").last
        shown = (await answer.locator(".msg-body").inner_text()).strip()
        stored = await history(url, await current_session(page))
        assert [t["role"] for t in stored] == ["user", "assistant"]
        assert stored[0]["content"] == "What is a binary tree?"
        assert shown and shown.split() == stored[1]["content"].split()  # the model's answer, as the server kept it
        partial = {r for r in await page.evaluate("window.__renders") if r and r.strip() != shown}
        assert len(partial) >= 3, f"the answer was not streamed: {partial}"
        meta = await answer.locator("footer").inner_text()
        assert re.fullmatch(r"\d+\.\d s · \d+ tokens?( · cut at the token limit)?", meta), meta


@pytest.fixture(params=["tiny_vl_engine", "openvino_tiny_vl_engine"])
def vision_engine(request: pytest.FixtureRequest):
    """The tiny Qwen3-VL on the transformers engine and on OpenVINO (what `auto` picks for images on a CPU)."""
    return request.getfixturevalue(request.param)


async def test_pasted_image_reaches_the_vision_model(vision_engine, app_settings, new_page, monkeypatch) -> None:
    tiny_vl_engine = vision_engine
    seen: list[GenerationRequest] = []
    real_generate = tiny_vl_engine.generate

    def spy(request: GenerationRequest):  # records what reached the engine, then runs the real generation
        seen.append(request)
        return real_generate(request)

    monkeypatch.setattr(tiny_vl_engine, "generate", spy)
    async with serve_app(tiny_vl_engine, app_settings(max_new_tokens=8)) as url:
        page = await new_page(url)
        await expect(page.get_by_role("status", name="Model status")).to_contain_text("vision")
        await page.evaluate(PASTE_JS, [png_b64((96, 64), (20, 160, 90)), "paste"])
        await expect(page.get_by_role("img", name="Attached image preview")).to_be_visible()

        await ask(page, "What is in this picture?")

        answer = page.get_by_role("article", name="Assistant message").last
        await expect(answer.locator("footer")).to_have_text(re.compile(r"\d+\.\d s · \d+ tokens?"))
        await expect(page.get_by_role("img", name="Image you sent")).to_be_visible()
        (image,) = seen[-1].messages[-1].images
        assert image.size == (96, 64) and image.getpixel((5, 5)) == (20, 160, 90)
        stored = await history(url, await current_session(page))
        assert stored[0]["has_image"] is True


async def test_stop_cancels_the_generation(smollm_engine, app_settings, new_page) -> None:
    async with serve_app(smollm_engine, app_settings(max_new_tokens=400, temperature=0.7)) as url:
        page = await new_page(url)
        box = page.get_by_role("textbox", name="Message")
        await box.fill("Write a long essay about sorting algorithms, with examples.")
        await box.press("Enter")
        answer = page.get_by_role("article", name="Assistant message").last
        await expect(answer.locator(".msg-body")).not_to_be_empty(timeout=60_000)  # tokens are streaming
        assert await running(url) == 1

        await page.get_by_role("button", name="Stop").click()

        await expect(answer.locator("footer")).to_have_text(re.compile(r"^Stopped after \d+\.\d s$"))
        await expect(page.get_by_role("button", name="Send")).to_be_visible()
        for _ in range(100):  # the server notices the closed connection and aborts the engine request
            if await running(url) == 0 and smollm_engine.stats.running == 0:
                break
            await asyncio.sleep(0.1)
        assert await running(url) == 0
        assert smollm_engine.stats.running == 0
        status = page.get_by_role("status", name="Model status")
        await expect(status).to_contain_text("SmolLM2-135M-Instruct · ready")
        await expect(status).not_to_contain_text("running", timeout=10_000)  # the page's own view agrees
        assert await history(url, await current_session(page)) == []  # an aborted answer is not kept


async def test_switching_sessions_shows_each_sessions_history(smollm_engine, app_settings, new_page) -> None:
    async with serve_app(smollm_engine, app_settings(max_new_tokens=6)) as url:
        page = await new_page(url)
        await ask(page, "Alpha: what is a stack?")
        alpha = await current_session(page)
        await page.get_by_role("button", name="New chat").click()
        await expect(page.get_by_role("article")).to_have_count(0)
        await ask(page, "Beta: what is a queue?")
        beta = await current_session(page)
        assert alpha != beta

        chats = page.get_by_role("list", name="Chat sessions")
        mine = page.get_by_role("article", name="Your message")
        await chats.get_by_role("button", name="Alpha: what is a stack?", exact=True).click()
        await expect(mine).to_have_text(["Alpha: what is a stack?"])
        await expect(page.get_by_role("article", name="Assistant message")).to_have_count(1)
        await chats.get_by_role("button", name="Beta: what is a queue?", exact=True).click()
        await expect(mine).to_have_text(["Beta: what is a queue?"])

        await page.reload()  # the open chat is remembered
        await page.wait_for_selector("body.ready")
        await expect(mine).to_have_text(["Beta: what is a queue?"])

        await page.get_by_role("button", name="Clear history").click()
        await expect(page.get_by_role("article")).to_have_count(0)
        assert await history(url, beta) == []
        assert len(await history(url, alpha)) == 2

        await chats.get_by_role("button", name="Delete chat: Alpha: what is a stack?").click()
        await expect(chats.get_by_role("button", name="Alpha: what is a stack?", exact=True)).to_have_count(0)
        async with httpx.AsyncClient(base_url=url) as client:
            ids = [s["session_id"] for s in (await client.get("sessions")).json()["sessions"]]
        assert alpha not in ids and beta in ids


async def test_screenshots_desktop_and_phone_light_and_dark(smollm_engine, app_settings, new_page) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with serve_app(smollm_engine, app_settings(max_new_tokens=80)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:  # an older chat, so the list shows two
            older = (await client.post("sessions")).json()["session_id"]
            chat = {"message": "What is a hash table?", "session_id": older, "max_new_tokens": 4}
            (await client.post("chat", json=chat)).raise_for_status()
        page = await new_page(url)  # desktop, light: the page that asks (its answer shows the response time)
        await page.get_by_role("button", name="New chat").click()
        await expect(page.get_by_role("article")).to_have_count(0)
        await ask(page, "Show a short Python function that reverses a list.")
        shots: list[Path] = []
        for name, viewport, scheme in [
            ("desktop", DESKTOP, "light"),
            ("desktop", DESKTOP, "dark"),
            ("phone", PHONE, "light"),
            ("phone", PHONE, "dark"),
        ]:
            first = (name, scheme) == ("desktop", "light")
            view = page if first else await new_page(url, viewport=viewport, color_scheme=scheme)
            await expect(view.get_by_role("article", name="Assistant message")).to_have_count(1)
            await expect(view.locator("html")).to_have_attribute("data-theme", scheme)
            await _assert_fits(view, viewport["width"])
            path = ARTIFACTS / f"chat-{name}-{scheme}.png"
            await view.screenshot(path=str(path))
            shots.append(path)
        # Phone: the chat list is a drawer behind the menu button.
        phone = await new_page(url, viewport=PHONE, reduced_motion="reduce")  # no slide: the shot shows it open
        chats = phone.get_by_role("list", name="Chat sessions")
        await expect(chats).not_to_be_in_viewport()
        await phone.get_by_role("button", name="Show chats").click()
        await expect(chats).to_be_in_viewport(ratio=1)
        await expect(chats.get_by_role("listitem")).to_have_count(2)
        path = ARTIFACTS / "chat-phone-drawer.png"
        await phone.screenshot(path=str(path))
        shots.append(path)
    assert all(p.stat().st_size > 10_000 for p in shots)


async def _assert_fits(page: Page, width: int) -> None:
    """Nothing scrolls sideways, and the composer is on screen."""
    assert await page.evaluate("document.documentElement.scrollWidth") == width
    await expect(page.get_by_role("textbox", name="Message")).to_be_in_viewport()
    await expect(page.get_by_role("button", name="Send")).to_be_in_viewport()


async def test_each_learner_sees_only_their_own_chats(smollm_engine, app_settings, browser, tmp_path) -> None:
    """Two learners in one browser, one after the other (/login, /logout): each lists and reopens only their own."""
    import hashlib

    keys = {"alice": "alice-web-key", "bob": "bob-web-key"}
    toml = "".join(
        f'[[keys]]\nname = "{n}"\nrole = "learner"\nsha256 = "{hashlib.sha256(k.encode()).hexdigest()}"\n\n'
        for n, k in keys.items()
    )
    (tmp_path / "keys.toml").write_text(toml)
    settings = app_settings(max_new_tokens=4, api_keys_file=tmp_path / "keys.toml")
    async with serve_app(smollm_engine, settings) as url:
        base = url.rstrip("/")
        context = await browser.new_context(viewport=DESKTOP)
        page = await context.new_page()
        chats = page.get_by_role("list", name="Chat sessions")

        async def login(name: str) -> None:
            await page.goto(f"{base}/login")
            await page.fill("#key", keys[name])
            await page.click("input[type=submit]")
            await page.wait_for_selector("body.ready")

        await login("alice")
        await ask(page, "Alpha: what is a stack?")
        await expect(chats.get_by_role("button", name="Alpha: what is a stack?", exact=True)).to_have_count(1)
        alices = await page.evaluate("localStorage.getItem('newbie-app.session.alice')")
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {keys['alice']}"}) as client:
            stored = (await client.get("/history", params={"session_id": alices})).json()["history"]
        assert stored[0]["content"] == "Alpha: what is a stack?"  # remembered under alice's name

        await page.request.post(f"{base}/logout")
        await login("bob")  # same browser, same storage: none of alice's chats, not even her remembered one
        await expect(page.get_by_role("article")).to_have_count(0)
        await expect(chats.get_by_role("button", name="Alpha: what is a stack?", exact=True)).to_have_count(0)
        await ask(page, "Beta: what is a queue?")
        bobs = await page.evaluate("localStorage.getItem('newbie-app.session.bob')")
        assert bobs and bobs != alices

        await page.request.post(f"{base}/logout")
        await login("alice")  # alice's own chat again
        await expect(page.get_by_role("article", name="Your message")).to_have_text(["Alpha: what is a stack?"])
        await expect(chats.get_by_role("button", name="Beta: what is a queue?", exact=True)).to_have_count(0)
        await context.close()
