"""The page's own behaviour with a scripted model: sanitized Markdown, keyboard, theme, attachments, error display.

The model's answer is faked here (a FakeEngine subclass whose answer is a fixed text) because these tests need to
control what the model says; the app, the server, the browser and the page are real.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Page, expect
from web_helpers import PASTE_JS, ask, png_b64, serve_app

from agent.engine.errors import InvalidRequestError
from agent.engine.fake import FakeEngine
from agent.engine.types import GenerationChunk, GenerationRequest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

XSS_ANSWER = """Here is **bold** text and a tip.

<script>window.__xss = "script tag"</script>
<img src="x" onerror="window.__xss = 'img onerror'">
<svg><image href="x" onerror="window.__xss = 'svg onerror'"></image></svg>
<iframe srcdoc="<script>parent.__xss = 'iframe'</script>"></iframe>
<details open ontoggle="window.__xss = 'ontoggle'"><summary>more</summary>hidden</details>

[a markdown link](javascript:void(window.__xss='markdown-link'))
<a href="javascript:window.__xss='html link'">an html link</a>
<a href="JaVaScRiPt:window.__xss='mixed case'">a mixed-case link</a>
[a safe link](https://example.org/page)

```python
print("<script>window.__xss = 'code'</script>")
```
"""


class ScriptedEngine(FakeEngine):
    """Answers every request with `answer`, streamed in small chunks (cutting through tags and Markdown markers)."""

    def __init__(self, answer: str, *, chunk: int = 7, fail_after: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.answer = answer
        self.chunk = chunk
        self.fail_after = fail_after  # raise after this many chunks: an error once the stream has started
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if request.images and not self.supports_images:
            raise InvalidRequestError("this model cannot see images")
        self.requests.append(request)
        pieces = [self.answer[i : i + self.chunk] for i in range(0, len(self.answer), self.chunk)]
        self.stats.running += 1
        try:
            for n, piece in enumerate(pieces, start=1):
                if self.fail_after is not None and n > self.fail_after:
                    raise InvalidRequestError("scripted failure in the middle of the answer")
                await asyncio.sleep(0.005)
                yield GenerationChunk(request.request_id, piece, 10, n, "stop" if n == len(pieces) else None)
        finally:
            self.stats.running -= 1


@pytest.fixture
async def scripted(app_settings):
    """Factory: serve the real app over a started ScriptedEngine; yields (url, engine)."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(answer: str = "Hello **there**.", **kwargs: object) -> tuple[str, ScriptedEngine]:
            settings = kwargs.pop("settings", None) or app_settings()
            engine = ScriptedEngine(answer, **kwargs)
            await engine.start()
            return await stack.enter_async_context(serve_app(engine, settings)), engine

        yield make


BIG_PASTE_JS = """(size) => {
  const file = new File([new Uint8Array(size)], "huge.png", { type: "image/png" });
  const dt = new DataTransfer();
  dt.items.add(file);
  document.getElementById("input").dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true }));
}"""


async def test_model_output_cannot_run_scripts(scripted, new_page) -> None:
    url, _ = await scripted(XSS_ANSWER)
    page = await new_page(url)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), asyncio.ensure_future(d.dismiss())))

    await ask(page, "show me some html")
    answer = page.get_by_role("article", name="Assistant message").last
    await _assert_rendered_safely(page, answer)

    for name in ["a markdown link", "an html link", "a mixed-case link"]:
        await answer.get_by_text(name).click()
    await page.wait_for_timeout(300)  # give any handler or failed image load time to fire
    assert await page.evaluate("window.__xss") is None
    assert dialogs == []

    # The same answer read back from /history (a reload) is sanitized too.
    await page.reload()
    await page.wait_for_selector("body.ready")
    await _assert_rendered_safely(page, page.get_by_role("article", name="Assistant message").last)


async def _assert_rendered_safely(page: Page, answer) -> None:
    await expect(answer.locator("strong")).to_have_text("bold")  # Markdown is rendered...
    code = answer.locator("pre code.hljs")
    await expect(code).to_contain_text("print(\"<script>window.__xss = 'code'</script>\")")  # ...code shown as text
    await expect(code.locator(".hljs-built_in, .hljs-string").first).to_be_visible()  # ...and highlighted
    await page.wait_for_timeout(300)
    assert await page.evaluate("window.__xss") is None
    html = await answer.inner_html()
    for forbidden in ["<script", "onerror", "ontoggle", "<iframe", "srcdoc", "javascript:"]:
        assert forbidden not in html.lower(), f"{forbidden!r} survived sanitizing: {html}"
    hrefs = await answer.locator("a[href]").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert hrefs == ["https://example.org/page"]
    assert await answer.locator("a[href]").get_attribute("rel") == "noopener noreferrer nofollow"


async def test_keyboard_enter_sends_shift_enter_adds_a_line(scripted, new_page) -> None:
    url, engine = await scripted("Noted.")
    page = await new_page(url)
    box = page.get_by_role("textbox", name="Message")
    await box.fill("first line")
    await box.press("Shift+Enter")
    await box.press_sequentially("<b>second</b> line")
    assert engine.requests == []  # Shift+Enter did not send
    await expect(box).to_have_value("first line\n<b>second</b> line")
    await box.press("Enter")
    mine = page.get_by_role("article", name="Your message").last
    # The learner's text is shown as typed (never parsed as HTML), line break included.
    await expect(mine).to_contain_text("<b>second</b> line")
    assert await mine.locator(".msg-body").inner_text() == "first line\n<b>second</b> line"
    await expect(page.get_by_role("article", name="Assistant message").last).to_have_attribute("aria-busy", "false")
    await expect(box).to_have_value("")
    assert engine.requests[0].messages[-1].text_content == "first line\n<b>second</b> line"
    meta = page.get_by_role("article", name="Assistant message").last.locator("footer")
    await expect(meta).to_have_text(re.compile(r"^\d+\.\d s · 1 token$"))


async def test_theme_follows_the_system_and_the_toggle(scripted, new_page) -> None:
    url, _ = await scripted()
    page = await new_page(url, color_scheme="dark")
    root = page.locator("html")
    await expect(root).to_have_attribute("data-theme", "dark")
    toggle = page.get_by_role("button", name="Dark mode")
    await expect(toggle).to_have_attribute("aria-pressed", "true")
    await toggle.click()
    await expect(root).to_have_attribute("data-theme", "light")
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(247, 248, 250)"
    await page.reload()
    await page.wait_for_selector("body.ready")
    await expect(root).to_have_attribute("data-theme", "light")  # the choice is remembered


@pytest.mark.parametrize("how", ["picker", "paste", "drop"])
async def test_image_attach_preview_and_send(scripted, new_page, how: str) -> None:
    url, engine = await scripted("A red rectangle.", supports_images=True)
    page = await new_page(url)
    await expect(page.get_by_role("status", name="Model status")).to_contain_text("vision")
    image = png_b64()
    if how == "picker":
        await page.get_by_label("Attach image").set_input_files(
            {"name": "shot.png", "mimeType": "image/png", "buffer": base64.b64decode(image)}
        )
    else:
        await page.evaluate(PASTE_JS, [image, how])
    preview = page.get_by_role("img", name="Attached image preview")
    await expect(preview).to_be_visible()
    await expect(page.locator("#attachment-info")).to_contain_text("shot.png")

    await ask(page, "what is this?")
    await expect(preview).to_be_hidden()  # sent: the composer is empty again
    await expect(page.get_by_role("img", name="Image you sent")).to_be_visible()
    (sent,) = engine.requests[-1].messages[-1].images
    assert sent.size == (64, 48) and sent.getpixel((10, 10)) == (200, 30, 30)


async def test_image_removed_from_composer_is_not_sent(scripted, new_page) -> None:
    url, engine = await scripted("Fine.", supports_images=True)
    page = await new_page(url)
    await page.evaluate(PASTE_JS, [png_b64(), "paste"])
    await page.get_by_role("button", name="Remove image").click()
    await expect(page.get_by_role("img", name="Attached image preview")).to_be_hidden()
    await ask(page, "no picture after all")
    assert engine.requests[-1].images == []


async def test_too_large_image_is_refused_in_the_page(scripted, new_page) -> None:
    url, engine = await scripted("unused", supports_images=True)
    page = await new_page(url)
    await page.evaluate(BIG_PASTE_JS, 11 * 1024 * 1024)
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("Image too large")
    await expect(alert).to_contain_text("MAX_IMAGE_BYTES")
    await expect(page.get_by_role("img", name="Attached image preview")).to_be_hidden()
    await page.get_by_role("button", name="Dismiss error").click()
    await expect(alert).to_be_hidden()
    assert engine.requests == []


async def test_text_only_model_says_it_cannot_see_images(scripted, new_page) -> None:
    url, engine = await scripted("unused", supports_images=False)
    page = await new_page(url)
    await expect(page.get_by_role("status", name="Model status")).to_contain_text("text only")
    await expect(page.get_by_label("Attach image")).to_be_disabled()
    await page.evaluate(PASTE_JS, [png_b64(), "paste"])
    await expect(page.get_by_role("alert")).to_contain_text("cannot see images")
    await expect(page.get_by_role("img", name="Attached image preview")).to_be_hidden()
    assert engine.requests == []


async def test_server_refusals_are_shown(scripted, app_settings, new_page) -> None:
    url, engine = await scripted("unused", settings=app_settings(max_message_chars=40))
    page = await new_page(url)
    await page.get_by_role("textbox", name="Message").fill("x" * 41)
    await page.get_by_role("button", name="Send").click()
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("413")
    await expect(alert).to_contain_text("MAX_MESSAGE_CHARS")
    await expect(page.get_by_role("article", name="Assistant message").last.locator("footer")).to_contain_text(
        "Failed after"
    )
    await expect(page.get_by_role("button", name="Send")).to_be_visible()  # ready for the next try
    assert engine.requests == []


async def test_error_in_the_middle_of_a_stream_is_shown(scripted, new_page) -> None:
    # Three 6-character chunks ("The first words ") reach the page, then the engine raises.
    url, _ = await scripted("The first words arrive, then the engine fails.", chunk=6, fail_after=3)
    page = await new_page(url)
    await page.get_by_role("textbox", name="Message").fill("go")
    await page.get_by_role("button", name="Send").click()
    await expect(page.get_by_role("alert")).to_contain_text("scripted failure in the middle of the answer")
    answer = page.get_by_role("article", name="Assistant message").last
    await expect(answer).to_contain_text("The first words")  # what arrived stays visible
    await expect(answer.locator("footer")).to_contain_text("Failed after")


async def test_unreachable_server_is_reported(scripted, new_page) -> None:
    url, _ = await scripted()
    page = await new_page(url)
    await page.route("**/chat", lambda route: route.abort("connectionrefused"))
    await page.get_by_role("textbox", name="Message").fill("hello?")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("alert")).to_contain_text("Cannot reach the server")


async def test_model_status_goes_from_loading_to_ready(app_settings, new_page) -> None:
    release = asyncio.Event()

    async def slow_loader(settings) -> FakeEngine:  # the app's background load, held until the page saw "loading"
        await release.wait()
        engine = FakeEngine(model_name="late-model", supports_images=True)
        await engine.start()
        return engine

    async with serve_app(None, app_settings(), loader=slow_loader) as url:
        page = await new_page(url)
        status = page.get_by_role("status", name="Model status")
        await expect(status).to_have_attribute("data-state", "loading")
        await expect(status).to_contain_text("Loading model")
        release.set()
        await expect(status).to_have_attribute("data-state", "ready", timeout=10_000)
        await expect(status).to_contain_text("late-model · ready")
        await expect(status).to_contain_text("vision")


# Feeds js/sse.js an SSE body cut at awkward places: mid-line, mid-UTF-8 character ("é" is 2 bytes), CRLF endings,
# a keep-alive comment, a multi-line data field and the OpenAI-style [DONE] terminator.
SSE_JS = """async () => {
  const { readSse } = await import("./js/sse.js");
  const text = ': ping\\r\\n\\r\\ndata: {"delta": "caf\\u00e9"}\\r\\n\\r\\ndata: {"delta":\\ndata: " ok"}\\n\\n'
    + 'data: {"done": true}\\n\\ndata: [DONE]\\n\\ndata: {"after": "done"}\\n\\n';
  const bytes = new TextEncoder().encode(text);
  const cuts = [3, 14, 31, 35, 50, bytes.length];  // 31: inside "é" (bytes 30-31); 35: inside "\\r\\n\\r\\n"
  let start = 0;
  const body = new ReadableStream({
    pull(controller) {
      const end = cuts.shift();
      controller.enqueue(bytes.slice(start, end));
      start = end;
      if (!cuts.length) controller.close();
    },
  });
  const events = [];
  for await (const event of readSse(body)) events.push(event);
  return events;
}"""


async def test_sse_reader_survives_arbitrary_chunking(scripted, new_page) -> None:
    url, _ = await scripted()
    page = await new_page(url)
    events = await page.evaluate(SSE_JS)
    assert events == [{"delta": "café"}, {"delta": " ok"}, {"done": True}]
