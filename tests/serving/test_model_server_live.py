"""The FastAPI door on real engines (transformers on SmolLM2-135M and the tiny Qwen3-VL) behind a real uvicorn
server on a free port: the seed's curl, history across a restart, the official openai client, concurrency with
batching, and images reaching a vision model."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from agent.config import load_settings
from agent.engine.base import Engine
from agent.engine.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from agent.serving.model_server import create_app
from tests.serving import live

pytestmark = pytest.mark.slow

SEED_BODY = {"message": "What is a binary tree?", "image_base64": None}


@contextlib.asynccontextmanager
async def serving(engine: Engine, db: Path, **overrides: object) -> AsyncIterator[str]:
    """The app on `engine` (already started, shared by the session) on a real uvicorn server on a free port."""
    async with live.serving(create_app(load_settings(history_db=db, **overrides), engine)) as url:
        yield url


def looks_like_english(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    return len(words) >= 5 and sum(len(w) for w in words) >= 0.6 * len(text.replace(" ", ""))


async def test_seed_curl_body_gets_a_coherent_answer(smollm_engine: Engine, tmp_path: Path) -> None:
    # The seed's body as it is; the server runs greedy (TEMPERATURE=0) so the check is deterministic.
    async with (
        serving(smollm_engine, tmp_path / "h.sqlite3", max_new_tokens=40, temperature=0.0) as url,
        httpx.AsyncClient(base_url=url, timeout=300) as client,
    ):
        assert (await client.get("/health")).json()["status"] == "ready"
        response = await client.post("/chat", json=SEED_BODY)
        assert response.status_code == 200, response.text
        answer = response.json()["response"]
        assert looks_like_english(answer) and "tree" in answer.lower(), answer
        assert response.json()["usage"]["completion_tokens"] > 5


async def test_history_survives_a_restart(smollm_engine: Engine, tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    opts = {"temperature": 0, "max_new_tokens": 12}
    async with serving(smollm_engine, db) as url, httpx.AsyncClient(base_url=url, timeout=120) as client:
        first = (await client.post("/chat", json={"message": "My name is Ada.", **opts})).json()
        second = (await client.post("/chat", json={"message": "What is a stack?", **opts})).json()
        history = (await client.get("/history")).json()["history"]
        assert [t["content"] for t in history] == [
            "My name is Ada.", first["response"], "What is a stack?", second["response"]
        ]  # fmt: skip
        # the second turn's prompt carried the first turn
        assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 10

    async with serving(smollm_engine, db) as url, httpx.AsyncClient(base_url=url, timeout=120) as client:
        assert len((await client.get("/history")).json()["history"]) == 4  # kept across the restart
        assert (await client.post("/clear_history")).status_code == 200
        assert (await client.get("/history")).json()["history"] == []


async def test_official_openai_client(smollm_engine: Engine, tmp_path: Path) -> None:
    async with serving(smollm_engine, tmp_path / "h.sqlite3") as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
        model = (await client.models.list()).data[0].id
        assert model == "SmolLM2-135M-Instruct"
        messages = [{"role": "user", "content": "What is a binary tree?"}]
        plain = await client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
        assert plain.choices[0].finish_reason in ("stop", "length")
        text = plain.choices[0].message.content or ""
        assert looks_like_english(text), text

        stream = await client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=12, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text  # greedy: the same answer either way
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        await client.close()


async def test_16_concurrent_chats_batch_together(smollm_engine: Engine, tmp_path: Path) -> None:
    async with (
        serving(smollm_engine, tmp_path / "h.sqlite3") as url,
        httpx.AsyncClient(base_url=url, timeout=300) as client,
    ):
        ids = [(await client.post("/sessions")).json()["session_id"] for _ in range(16)]
        bodies = [
            {"message": f"Name a data structure, number {i}.", "session_id": sid, "max_new_tokens": 8}
            for i, sid in enumerate(ids)
        ]
        answers = await asyncio.gather(*(client.post("/chat", json=b) for b in bodies))
        assert [a.status_code for a in answers] == [200] * 16
        assert all(a.json()["response"].strip() for a in answers)
        metrics = (await client.get("/metrics")).text
    count = float(re.search(r"^dsa_engine_batch_size_count (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    ones = float(re.search(r'^dsa_engine_batch_size_bucket\{le="1.0"\} (\S+)$', metrics, re.M).group(1))  # type: ignore[union-attr]
    assert count > ones, "no forward step had more than one sequence"
    le8 = float(re.search(r'^dsa_engine_batch_size_bucket\{le="8.0"\} (\S+)$', metrics, re.M).group(1))  # type: ignore[union-attr]
    assert count > le8, "16 concurrent requests never shared a step of more than 8"
    assert 'dsa_requests_total{route="/chat",status="200"} 16.0' in metrics


def image_b64(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def test_image_reaches_the_vision_model(tiny_vl_engine: Engine, tmp_path: Path) -> None:
    question = "Describe the image."
    opts = {"temperature": 0, "max_new_tokens": 12}
    async with (
        serving(tiny_vl_engine, tmp_path / "h.sqlite3") as url,
        httpx.AsyncClient(base_url=url, timeout=120) as client,
    ):
        text_only = await client.post("/chat", json={"message": question, **opts})
        answers = []
        for seed in (1, 2):
            sid = (await client.post("/sessions")).json()["session_id"]
            body = {"message": question, "image_base64": image_b64(seed), "session_id": sid, **opts}
            response = await client.post("/chat", json=body)
            assert response.status_code == 200, response.text
            answers.append(response.json())
            assert (await client.get("/history", params={"session_id": sid})).json()["history"][0]["has_image"]
    # The prompt the engine built for the same message carries image tokens ...
    decoded = Image.open(io.BytesIO(base64.b64decode(image_b64(1)))).convert("RGB")
    request = GenerationRequest(
        messages=(Message(role="user", parts=(ImagePart(decoded), TextPart(question))),),
        sampling=SamplingParams(max_new_tokens=1),
    )
    image_tokens = tiny_vl_engine.count_image_tokens(request)  # type: ignore[attr-defined]
    assert image_tokens > 0
    # ... and they were in the prompt the server sent: it is longer than the text-only one by at least that much.
    extra = answers[0]["usage"]["prompt_tokens"] - text_only.json()["usage"]["prompt_tokens"]
    assert extra >= image_tokens
    assert answers[0]["response"] != answers[1]["response"], "two different images gave the same greedy answer"
