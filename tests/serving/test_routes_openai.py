"""OpenAI-compatible routes with FakeEngine, driven by the official `openai` client and by raw HTTP."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from agent.config import load_settings
from agent.engine.fake import FakeEngine
from agent.serving.model_server import create_app


@contextlib.asynccontextmanager
async def client_for(tmp_path: Path, engine: FakeEngine | None = None) -> AsyncIterator[httpx.AsyncClient]:
    engine = engine or FakeEngine(model_name="fake-model")
    await engine.start()
    app = create_app(load_settings(history_db=tmp_path / "history.sqlite3"), engine)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


def data_url(color: str = "green") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sse_data(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


async def test_openai_client_plain_and_stream(tmp_path: Path) -> None:
    async with client_for(tmp_path) as http:
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="unused", http_client=http)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["fake-model"]

        messages = [
            {"role": "system", "content": "You are a tutor."},
            {"role": "user", "content": "old question"},
            {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "What is a binary tree?"},
        ]
        completion = await client.chat.completions.create(model="fake-model", messages=messages, max_tokens=3)
        assert completion.choices[0].message.content == "echo: What is"
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + 3
        assert completion.id.startswith("chatcmpl-") and completion.model == "fake-model"

        stream = await client.chat.completions.create(
            model="fake-model", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: What is a binary tree?"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        assert len({c.id for c in chunks}) == 1


async def test_raw_sse_ends_with_done(tmp_path: Path) -> None:
    async with client_for(tmp_path) as http:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi there"}], "stream": True}
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        data = sse_data(response.text)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "usage" not in chunks[-1] or chunks[-1]["usage"] is None  # no usage chunk unless asked
        # the stateless route stores nothing
        assert (await http.get("/history")).json()["history"] == []


async def test_images_as_data_urls(tmp_path: Path) -> None:
    engine = FakeEngine(model_name="vl", supports_images=True)
    async with client_for(tmp_path, engine) as http:
        content = [{"type": "text", "text": "what colour?"}, {"type": "image_url", "image_url": {"url": data_url()}}]
        body = {"model": "vl", "messages": [{"role": "user", "content": content}]}
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "echo: what colour? [1 images]"
        assert engine.last_request is not None and engine.last_request.images[0].size == (8, 8)


@pytest.mark.parametrize(
    ("body", "status", "code", "contains"),
    [
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "not_found", "fake-model"),
        ({"messages": []}, 422, "validation_error", "messages"),
        ({"messages": [{"role": "critic", "content": "x"}]}, 422, "validation_error", "role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_request", "tool_call_id"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 422, "validation_error", "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
         "invalid_request", "tools[0]"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 422, "validation_error",
         "max_tokens: 100000 is more than MAX_NEW_TOKENS"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 422, "validation_error",
         "temperature"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}}]}]},
         400, "unsupported_input", "text-only"),
    ],
)  # fmt: skip
async def test_bad_requests(tmp_path: Path, body: dict, status: int, code: str, contains: str) -> None:
    async with client_for(tmp_path) as http:
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["type"] == code and contains in error["message"]


async def test_remote_image_urls_are_refused(tmp_path: Path) -> None:
    async with client_for(tmp_path, FakeEngine(supports_images=True)) as http:
        part = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
        response = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]})
        assert response.status_code == 400 and "data: URLs" in response.json()["error"]["message"]


async def test_openai_client_sees_errors_as_exceptions(tmp_path: Path) -> None:
    async with client_for(tmp_path) as http:
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="unused", http_client=http, max_retries=0)
        with pytest.raises(openai.NotFoundError, match="fake-model"):
            await client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])


async def test_ignore_eos_extension_reaches_the_engine(tmp_path: Path) -> None:
    """vLLM's `ignore_eos` (used by `make bench` for fixed-length requests) is honoured like `vllm serve` does."""
    engine = FakeEngine(model_name="fake-model")
    async with client_for(tmp_path, engine) as http:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        assert engine.last_request is not None and engine.last_request.sampling.ignore_eos is False
        assert (await http.post("/v1/chat/completions", json={**body, "ignore_eos": True})).status_code == 200
        assert engine.last_request.sampling.ignore_eos is True
