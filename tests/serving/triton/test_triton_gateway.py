"""TritonGatewayEngine (FastAPI's engine in gateway mode) against the real Triton server of the test session."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from agent.config import load_settings
from agent.engine.errors import ModelLoadError, UnsupportedInputError
from agent.engine.prompt import render_prompt
from agent.engine.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from agent.serving.triton.gateway import TritonGatewayEngine
from tests.serving.triton import triton_fixtures
from tests.serving.triton.triton_fixtures import CONTROL_KEY, MODEL, RunningTriton

pytestmark = [pytest.mark.slow, pytest.mark.triton]

triton_smollm = triton_fixtures.triton_smollm  # the session's shared server (see triton_fixtures)
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


def gateway_settings(triton: RunningTriton, **extra: object):
    return load_settings(
        loading_strategy="triton",
        triton_grpc_url=triton.grpc_url,
        triton_http_url=triton.http_url,
        triton_metrics_port=triton.server.cfg.metrics_port,
        **extra,
    )


@pytest.fixture
async def gateway(triton_smollm: RunningTriton):
    engine = TritonGatewayEngine.from_settings(gateway_settings(triton_smollm, api_keys=f"{CONTROL_KEY},other"))
    await engine.start()
    yield engine
    await engine.shutdown()


async def test_gateway_streams_what_the_triton_door_answers(gateway: TritonGatewayEngine, triton_smollm) -> None:
    info = gateway.info()
    assert (info.engine, info.supports_images) == ("triton/transformers", False)
    assert info.model_name.startswith("SmolLM2") and await gateway.health()
    request = GenerationRequest(messages=(Message.text("user", "What is a stack?"),), sampling=GREEDY)
    chunks = [c async for c in gateway.generate(request)]
    assert len(chunks) > 1 and chunks[-1].finish_reason in ("stop", "length")
    assert all(c.finish_reason is None for c in chunks[:-1])
    status, raw = triton_smollm.post(
        f"/v2/models/{MODEL}/generate", {"text_input": "What is a stack?", "max_tokens": 6, "temperature": 0.0}
    )
    direct = json.loads(raw)
    assert "".join(c.text for c in chunks) == direct["text_output"]
    assert chunks[-1].completion_tokens == direct["completion_tokens"]
    assert gateway.stats.running == 0


async def test_gateway_abort_cancels_the_triton_request(gateway: TritonGatewayEngine, triton_smollm) -> None:
    aborted_before = triton_smollm.metric("dsa_triton_aborted_requests_total")
    request = GenerationRequest(
        messages=(Message.text("user", "Write a long essay on graphs."),),
        sampling=SamplingParams(max_new_tokens=64, temperature=0.0),
    )
    chunks = []
    async for chunk in gateway.generate(request):
        chunks.append(chunk)
        if len(chunks) == 2:
            await gateway.abort(request.request_id)
    assert chunks[-1].finish_reason == "abort" and len(chunks) == 3
    await asyncio.to_thread(triton_smollm.wait_idle)
    assert triton_smollm.metric("dsa_triton_running_requests") == 0
    assert triton_smollm.metric("dsa_triton_engine_running_requests") == 0  # the engine itself let it go
    assert triton_smollm.metric("dsa_triton_aborted_requests_total") == aborted_before + 1


async def test_gateway_maps_triton_errors_to_the_error_table(gateway: TritonGatewayEngine) -> None:
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    request = GenerationRequest(
        messages=(Message(role="user", parts=(ImagePart(image), TextPart("see?"))),), sampling=GREEDY
    )
    with pytest.raises(UnsupportedInputError):
        async for _ in gateway.generate(request):
            pass


def test_fastapi_gateway_and_triton_door_render_the_same_prompt(
    triton_smollm: RunningTriton, smollm_folder: Path, tmp_path: Path
) -> None:
    """One conversation through FastAPI (/chat with session history, gateway mode) and through Triton (`messages`).

    The model logs the prompt it rendered for each request; both must be the shared renderer's output for the
    conversation, with the history FastAPI kept.
    """
    from agent.serving.model_server import create_app

    settings = gateway_settings(triton_smollm, history_db=tmp_path / "history.sqlite3")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        first = client.post("/chat", json={"message": "Hi, I am Ana.", "max_new_tokens": 4})
        assert first.status_code == 200, first.text
        answer = first.json()["response"]
        second = client.post("/chat", json={"message": "What is my name?", "max_new_tokens": 4})
        assert second.status_code == 200, second.text
    via_fastapi = triton_smollm.prompts()[-1]["prompt"]

    conversation = [
        {"role": "user", "content": "Hi, I am Ana."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "What is my name?"},
    ]
    status, raw = triton_smollm.post(
        f"/v2/models/{MODEL}/generate", {"messages": json.dumps(conversation), "max_tokens": 4}
    )
    assert status == 200, raw
    via_triton = triton_smollm.prompts()[-1]["prompt"]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_folder)
    expected = render_prompt(tokenizer, [Message.text(m["role"], m["content"]) for m in conversation], vision=False)
    assert via_fastapi == via_triton == expected
    assert "Hi, I am Ana." in expected and answer.strip() in expected


def _png_b64(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def test_reload_keeps_serving_on_failure_and_an_image_reaches_tiny_qwen3vl(
    gateway: TritonGatewayEngine, triton_smollm: RunningTriton, tiny_vl_folder: Path
) -> None:
    generate = f"/v2/models/{MODEL}/generate"
    keyless = TritonGatewayEngine(triton_smollm.grpc_url)  # API_KEYS guard Triton's model control too
    await keyless.start()
    try:
        with pytest.raises(ModelLoadError, match="restricted"):
            await keyless.reload({"max_new_tokens": 8})
    finally:
        await keyless.shutdown()
    with pytest.raises(ModelLoadError, match="MODEL_PATH"):
        await gateway.reload({"model_path": "/no/such/model"})
    assert triton_smollm.get(f"/v2/models/{MODEL}/ready")[0] == 200
    status, raw = triton_smollm.post(generate, {"text_input": "Still SmolLM?", "max_tokens": 2})
    assert status == 200 and json.loads(raw)["completion_tokens"] > 0
    assert gateway.info().model_name.startswith("SmolLM2")

    try:
        info = await gateway.reload({"model_path": str(tiny_vl_folder)})
        assert info.supports_images and info.engine == "triton/transformers"
        body = {"text_input": "Describe the picture.", "max_tokens": 8, "temperature": 0.0}
        answers = {}
        for name, extra in {"none": {}, "red": {"image": [_png_b64((255, 0, 0))]}}.items():
            status, raw = triton_smollm.post(generate, {**body, **extra})
            assert status == 200, raw
            answers[name] = json.loads(raw)
        # The image's tokens reach the model: the prompt grows and the (greedy) answer changes.
        assert answers["red"]["prompt_tokens"] > answers["none"]["prompt_tokens"]
        assert answers["red"]["text_output"] != answers["none"]["text_output"]
    finally:
        info = await gateway.reload({"model_path": None})  # back to the environment's SmolLM2
    assert info.model_name.startswith("SmolLM2") and not info.supports_images


async def test_load_model_on_the_source_tree_reloads_parameters_instead_of_adding_a_version(
    gateway: TritonGatewayEngine, triton_smollm: RunningTriton
) -> None:
    """The session server serves the source repository, which is never written: /load_model's gateway path falls
    back to reloading the serving version with new parameters (docs/versioning.md)."""
    from agent.serving.triton.launcher import MODEL_REPOSITORY

    before = {p.name for p in (MODEL_REPOSITORY / MODEL).iterdir()}
    try:
        info = await gateway.load_model({"max_new_tokens": 3})
        assert info.model_name.startswith("SmolLM2")
        config = (await gateway._client.get_model_config(MODEL, as_json=True))["config"]
        assert config["parameters"]["MAX_NEW_TOKENS"]["string_value"] == "3"
        status, raw = triton_smollm.post(f"/v2/models/{MODEL}/generate", {"text_input": "Count to ten."})
        assert status == 200 and json.loads(raw)["completion_tokens"] <= 3  # the new default bound applies
    finally:
        await gateway.reload({"max_new_tokens": None})
    assert {p.name for p in (MODEL_REPOSITORY / MODEL).iterdir()} == before  # nothing written into the source
