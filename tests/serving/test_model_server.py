"""The FastAPI door's seed and session routes with FakeEngine: every route and every error path (no real model)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from agent.config import Settings, load_settings
from agent.engine.base import Engine
from agent.engine.errors import ModelLoadError
from agent.engine.fake import FakeEngine
from agent.engine.types import GenerationChunk, GenerationRequest
from agent.serving.model_server import WEB_UI_DIR, create_app

SEED_BODY = {"message": "What is a binary tree?", "image_base64": None}


@contextlib.asynccontextmanager
async def client_for(
    tmp_path: Path,
    engine: Engine | None = None,
    loader: Callable[[Settings], Any] | None = None,
    **overrides: object,
) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of a fresh app (lifespan included) on a temporary history file."""
    if engine is None and loader is None:
        engine = FakeEngine()
    if engine is not None:
        await engine.start()
    app = create_app(load_settings(history_db=tmp_path / "history.sqlite3", **overrides), engine, loader=loader)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


def sse_data(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def png_b64(size: tuple[int, int] = (8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def assert_error(response: httpx.Response, status: int, code: str, contains: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == code and error["code"] == status and "param" in error
    assert contains in error["message"], error["message"]
    return error


async def test_seed_routes(tmp_path: Path) -> None:
    async with client_for(tmp_path) as client:
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json() | {"model": None} == {
            "status": "ready", "model": None, "engine": "fake", "running": 0, "waiting": 0
        }  # fmt: skip
        assert health.json()["model"]["model_name"] == "fake"

        answer = await client.post("/chat", json=SEED_BODY)
        assert answer.status_code == 200
        body = answer.json()
        assert body["response"] == "echo: What is a binary tree?" and body["session_id"] == "default"
        assert body["finish_reason"] == "stop" and body["usage"] == {"prompt_tokens": 9, "completion_tokens": 6}
        assert body["response_time"] >= 0

        await client.post("/chat", json={"message": "and a heap?", "temperature": 0, "top_p": 1, "seed": 3})
        history = (await client.get("/history")).json()
        assert history["session_id"] == "default"
        assert [(t["role"], t["content"], t["has_image"]) for t in history["history"]] == [
            ("user", "What is a binary tree?", False),
            ("assistant", "echo: What is a binary tree?", False),
            ("user", "and a heap?", False),
            ("assistant", "echo: and a heap?", False),
        ]
        cleared = await client.post("/clear_history")
        assert cleared.json() == {"status": "cleared", "session_id": "default"}
        assert (await client.get("/history")).json()["history"] == []


async def test_docs_and_request_id(tmp_path: Path) -> None:
    async with client_for(tmp_path) as client:
        assert "swagger" in (await client.get("/docs")).text.lower()
        assert "redoc" in (await client.get("/redoc")).text.lower()
        paths = (await client.get("/openapi.json")).json()["paths"]
        for path in ("/health", "/chat", "/load_model", "/clear_history", "/history", "/sessions", "/v1/models"):
            assert path in paths
        response = await client.get("/health", headers={"X-Request-ID": "trace-42"})
        assert response.headers["x-request-id"] == "trace-42"
        assert len((await client.get("/health")).headers["x-request-id"]) == 32


async def test_chat_stream_sse(tmp_path: Path) -> None:
    async with client_for(tmp_path) as client:
        response = await client.post("/chat", json={"message": "stream this", "stream": True})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(e) for e in sse_data(response.text)]
        assert events[:-1] == [{"delta": "echo:"}, {"delta": " stream"}, {"delta": " this"}]
        done = events[-1]
        assert done["done"] is True and done["response"] == "echo: stream this" and done["finish_reason"] == "stop"
        assert set(done) >= {"usage", "response_time", "session_id"}
        history = (await client.get("/history")).json()["history"]
        assert history[-1]["content"] == "echo: stream this"


async def test_stream_errors_before_output_are_json(tmp_path: Path) -> None:
    async with client_for(tmp_path) as client:
        response = await client.post("/chat", json={"message": "x", "stream": True, "session_id": "nope"})
        assert_error(response, 404, "not_found", "nope")


class FailingEngine(FakeEngine):
    """Breaks after its first word (an engine bug)."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk(request.request_id, "partial", 1, 1)
        raise RuntimeError("CUDA error: device-side assert")


async def test_engine_bug_is_500_logged_with_request_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with client_for(tmp_path, FailingEngine()) as client:
        with caplog.at_level(logging.ERROR):
            response = await client.post("/chat", json={"message": "hi"}, headers={"X-Request-ID": "req-500"})
        assert_error(response, 500, "engine_failure", "req-500")
        assert any("req-500" in r.getMessage() and r.exc_info for r in caplog.records)

        streamed = await client.post("/chat", json={"message": "hi", "stream": True})
        assert streamed.status_code == 200
        events = [json.loads(e) for e in sse_data(streamed.text)]
        assert events[0] == {"delta": "partial"}
        assert events[-1]["error"]["code"] == 500 and events[-1]["error"]["type"] == "engine_failure"
        assert (await client.get("/history")).json()["history"] == []  # failed answers are not stored


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "contains"),
    [
        ({"content": b'{"message": "hi"', "headers": {"content-type": "application/json"}}, 400, "invalid_request",
         "malformed JSON"),
        ({"content": b'{"message": "hi"}', "headers": {"content-type": "text/plain"}}, 400, "invalid_request",
         "Content-Type: application/json"),
        ({"json": {"message": 123}}, 422, "validation_error", "message"),
        ({"json": {"message": "hi", "temperature": "hot"}}, 422, "validation_error", "temperature"),
        ({"json": {"message": "hi", "temperature": 3}}, 422, "validation_error", "temperature"),
        ({"json": {"message": "hi", "top_p": 0}}, 422, "validation_error", "top_p"),
        ({"json": {"message": "hi", "max_new_tokens": 0}}, 422, "validation_error", "max_new_tokens"),
        ({"json": {"message": "hi", "max_new_tokens": 513}}, 422, "validation_error", "MAX_NEW_TOKENS=512"),
        ({"json": {"message": "hi", "stream": "maybe"}}, 422, "validation_error", "stream"),
        ({"json": {"message": "hi", "session_id": "bad id!"}}, 422, "validation_error", "session_id"),
        ({"json": {"image_base64": None}}, 422, "validation_error", "message"),
        ({"json": {"message": ""}}, 422, "validation_error", "must not be empty"),
        ({"json": {"message": "   \n"}}, 422, "validation_error", "must not be empty"),
        ({"json": {"message": "x" * 101}}, 413, "payload_too_large", "MAX_MESSAGE_CHARS=100"),
        ({"json": {"message": "hi", "session_id": "unknown"}}, 404, "not_found", "unknown"),
        ({"json": {"message": "hi", "image_base64": png_b64()}}, 400, "unsupported_input", "load_model"),
    ],
)  # fmt: skip
async def test_chat_bad_input(tmp_path: Path, kwargs: dict, status: int, code: str, contains: str) -> None:
    async with client_for(tmp_path, max_message_chars=100) as client:
        assert_error(await client.post("/chat", **kwargs), status, code, contains)


async def test_image_errors_on_a_vision_model(tmp_path: Path) -> None:
    async with client_for(tmp_path, FakeEngine(supports_images=True), max_image_pixels=4096) as client:
        ok = await client.post("/chat", json={"message": "colour?", "image_base64": png_b64()})
        assert ok.status_code == 200 and ok.json()["response"].endswith("[1 images]")
        assert (await client.get("/history")).json()["history"][0]["has_image"] is True
        bad = await client.post("/chat", json={"message": "colour?", "image_base64": "%%% not base64"})
        assert_error(bad, 400, "invalid_request", "base64")
        not_image = base64.b64encode(b"just text, no picture").decode()
        assert_error(await client.post("/chat", json={"message": "?", "image_base64": not_image}), 400,
                     "invalid_request", "not a readable image")  # fmt: skip
        big = await client.post("/chat", json={"message": "?", "image_base64": png_b64((100, 100))})
        assert_error(big, 413, "payload_too_large", "MAX_IMAGE_PIXELS")


async def test_body_limit(tmp_path: Path) -> None:
    async with client_for(tmp_path, max_body_bytes=2048) as client:
        big = {"message": "x" * 4000}
        assert_error(await client.post("/chat", json=big), 413, "payload_too_large", "MAX_BODY_BYTES=2048")

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
            yield b'{"message": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        response = await client.post("/chat", content=chunked(), headers={"content-type": "application/json"})
        assert_error(response, 413, "payload_too_large", "MAX_BODY_BYTES=2048")
        assert (await client.post("/chat", json={"message": "small"})).status_code == 200


async def test_overload_is_429_with_retry_after(tmp_path: Path) -> None:
    engine = FakeEngine(step_delay=0.05)
    async with client_for(tmp_path, engine, max_concurrent_requests=1, max_queue=0) as client:
        first = asyncio.create_task(client.post("/chat", json={"message": "one two three"}))
        await asyncio.sleep(0.03)
        busy = await client.post("/chat", json={"message": "me too"})
        assert_error(busy, 429, "overloaded", "MAX_CONCURRENT_REQUESTS=1")
        assert int(busy.headers["retry-after"]) >= 1
        assert (await first).status_code == 200
        health = (await client.get("/health")).json()
        assert (health["running"], health["waiting"]) == (0, 0)


async def test_loading_is_503_with_retry_after(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def slow_loader(settings: Settings) -> FakeEngine:
        await gate.wait()
        engine = FakeEngine(model_name="late")
        await engine.start()
        return engine

    async with client_for(tmp_path, loader=slow_loader) as client:
        health = await client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        assert int(health.headers["retry-after"]) >= 1
        chat = await client.post("/chat", json=SEED_BODY)
        assert_error(chat, 503, "not_ready", "loading")
        assert int(chat.headers["retry-after"]) >= 1
        assert_error(await client.get("/v1/models"), 503, "not_ready")
        gate.set()
        for _ in range(100):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/health")).json()["model"]["model_name"] == "late"
        assert (await client.post("/chat", json=SEED_BODY)).status_code == 200


async def test_failed_startup_load_is_reported(tmp_path: Path) -> None:
    async def broken(settings: Settings) -> FakeEngine:
        raise ModelLoadError("MODEL_PATH='/nowhere': no such folder")

    async with client_for(tmp_path, loader=broken) as client:
        await asyncio.sleep(0.01)
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "failed", "error": "MODEL_PATH='/nowhere': no such folder"}


async def test_load_model(tmp_path: Path) -> None:
    requested: list[Settings] = []

    async def loader(settings: Settings) -> FakeEngine:
        requested.append(settings)
        if settings.model_path == "/missing":
            raise ModelLoadError("MODEL_PATH='/missing': no such folder")
        engine = FakeEngine(model_name=f"model-{len(requested)}", supports_images=True)
        await engine.start()
        return engine

    async with client_for(tmp_path, FakeEngine(model_name="first"), loader=loader) as client:
        loaded = await client.post("/load_model", json={"model_path": "/models/vl", "dtype": "float32"})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["status"] == "loaded" and loaded.json()["model"]["model_name"] == "model-1"
        assert requested[-1].model_path == "/models/vl" and requested[-1].dtype == "float32"
        assert (await client.get("/health")).json()["model"]["model_name"] == "model-1"
        # the new model takes images
        assert (await client.post("/chat", json={"message": "?", "image_base64": png_b64()})).status_code == 200

        failed = await client.post("/load_model", json={"model_path": "/missing"})
        assert_error(failed, 422, "model_load_failed", "no such folder")
        assert (await client.get("/health")).json()["model"]["model_name"] == "model-1"  # old one still serves

        # unset fields keep current values; an explicit null model_path means the embedded default
        await client.post("/load_model", json={"quantization_type": "none"})
        assert requested[-1].model_path == "/models/vl" and requested[-1].dtype == "float32"
        await client.post("/load_model", json={"model_path": None})
        assert requested[-1].model_path is None
        await client.post("/load_model")
        assert len(requested) == 5

        bad = await client.post("/load_model", json={"quantization_type": "int3"})
        assert_error(bad, 422, "validation_error", "quantization_type")


async def test_sessions(tmp_path: Path) -> None:
    async with client_for(tmp_path) as client:
        first = (await client.post("/sessions")).json()["session_id"]
        second = (await client.post("/sessions")).json()["session_id"]
        assert first != second
        await client.post("/chat", json={"message": "first session question", "session_id": first})
        listed = (await client.get("/sessions")).json()["sessions"]
        assert listed[0] == {
            "session_id": first, "title": "first session question", "turns": 1, "updated_at": listed[0]["updated_at"],
            "owner": "local",
        }  # fmt: skip
        assert {s["session_id"] for s in listed} >= {first, second}
        history = (await client.get("/history", params={"session_id": first})).json()
        assert history["session_id"] == first and len(history["history"]) == 2
        assert (await client.get("/history")).json()["history"] == []  # the default session is separate

        cleared = await client.post("/clear_history", json={"session_id": first})
        assert cleared.json() == {"status": "cleared", "session_id": first}
        deleted = await client.delete(f"/sessions/{first}")
        assert deleted.status_code == 200 and deleted.json()["session_id"] == first
        assert_error(await client.delete(f"/sessions/{first}"), 404, "not_found")
        assert_error(await client.get("/history", params={"session_id": first}), 404, "not_found")
        assert_error(await client.post("/clear_history", json={"session_id": first}), 404, "not_found")


async def test_unknown_route_and_method(tmp_path: Path) -> None:
    async with client_for(tmp_path) as client:
        assert_error(await client.get("/v1/nothing"), 404, "not_found")
        assert_error(await client.post("/health"), 405, "method_not_allowed")


async def test_metrics(tmp_path: Path) -> None:
    async with client_for(tmp_path, FakeEngine(step_delay=0.01)) as client:
        await asyncio.gather(*(client.post("/chat", json={"message": f"question number {i}"}) for i in range(4)))
        await client.post("/chat", json={"message": ""})
        text = (await client.get("/metrics")).text
        for name in (
            "dsa_requests_total", "dsa_request_seconds", "dsa_time_to_first_token_seconds",
            "dsa_inter_token_latency_seconds", "dsa_generated_tokens_total", "dsa_prompt_tokens_total",
            "dsa_running_requests", "dsa_waiting_requests", "dsa_engine_batch_size", "dsa_queue_seconds",
        ):  # fmt: skip
            assert f"# HELP {name} " in text, name
        assert 'dsa_requests_total{route="/chat",status="200"} 4.0' in text
        assert 'dsa_requests_total{route="/chat",status="422"} 1.0' in text
        assert "dsa_generated_tokens_total 16.0" in text  # 4 answers of 4 words
        assert "dsa_time_to_first_token_seconds_count 4.0" in text
        count = float(text.split("dsa_engine_batch_size_count ")[1].split()[0])
        ones = float(text.split('dsa_engine_batch_size_bucket{le="1.0"} ')[1].split()[0])
        assert count > ones  # the 4 concurrent requests shared steps (batch size > 1)


@pytest.mark.slow
async def test_prefix_cache_metric_counts_a_conversations_reused_history(tmp_path: Path, smollm_folder: Path) -> None:
    """The ONNX engine (real int4 SmolLM2): the second turn of a conversation starts with the first turn, so the
    prefix cache serves those tokens, and /metrics counts them."""
    from agent.config import Quantization
    from agent.engine.onnx.engine import OnnxEngine
    from agent.engine.spec import EngineSpec

    engine = OnnxEngine(
        EngineSpec(
            folder=smollm_folder,
            name="SmolLM2-135M-Instruct",
            quantization=Quantization.int4,
            cache_dir=load_settings().model_cache_dir,
        )
    )
    try:
        async with client_for(tmp_path, engine) as client:
            for question in ("What is a stack?", "And a queue?"):
                body = {"message": question, "max_new_tokens": 8}
                assert (await client.post("/chat", json=body)).status_code == 200
            text = (await client.get("/metrics")).text
        assert "# HELP dsa_prefix_cached_tokens_total " in text
        sample = "dsa_prefix_cached_tokens_total "
        cached = [float(line.split()[1]) for line in text.splitlines() if line.startswith(sample)]
        assert cached and cached[0] >= 16
    finally:
        await engine.shutdown()


@pytest.mark.skipif(not (WEB_UI_DIR / "index.html").is_file(), reason="web UI not present")
async def test_web_ui_is_served_without_shadowing_the_api(tmp_path: Path) -> None:
    async with client_for(tmp_path) as client:
        index = await client.get("/")
        assert index.status_code == 200 and "text/html" in index.headers["content-type"]
        assert (await client.get("/health")).headers["content-type"] == "application/json"
