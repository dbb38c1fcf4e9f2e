"""The Triton door against the real server (SmolLM2 on the transformers engine, the shipped model repository)."""

from __future__ import annotations

import base64
import io
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from agent.serving.triton import protocol as proto
from tests.serving.triton import triton_fixtures
from tests.serving.triton.triton_fixtures import MODEL, RunningTriton, grpc_inputs, grpc_stream

triton_smollm = triton_fixtures.triton_smollm  # the session's shared server (see triton_fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.triton]

GENERATE = f"/v2/models/{MODEL}/generate"


def sse_events(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]


def test_every_seed_url_answers(triton_smollm: RunningTriton) -> None:
    assert triton_smollm.get("/v2/health/live")[0] == 200
    assert triton_smollm.get("/v2/health/ready")[0] == 200
    status, body = triton_smollm.get("/v2")
    assert status == 200 and json.loads(body)["name"] == "triton"
    status, body = triton_smollm.get(f"/v2/models/{MODEL}")
    meta = json.loads(body)
    assert status == 200 and meta["platform"] == "python"
    assert {i["name"] for i in meta["inputs"]} == set(proto.INPUT_DATATYPES)
    assert {o["name"] for o in meta["outputs"]} == set(proto.OUTPUT_NAMES)
    assert triton_smollm.get(f"/v2/models/{MODEL}/ready")[0] == 200


def test_http_generate_and_generate_stream_answer_and_are_counted(triton_smollm: RunningTriton) -> None:
    before = triton_smollm.metric("nv_inference_request_success")
    body = {"text_input": "What is a binary tree?", "max_tokens": 8, "temperature": 0.0}
    status, raw = triton_smollm.post(GENERATE, body)
    answer = json.loads(raw)
    assert status == 200, raw
    assert answer["text_output"].strip() and answer["finish_reason"] in ("stop", "length")
    assert 0 < answer["completion_tokens"] <= 8 and answer["prompt_tokens"] > 5

    status, raw = triton_smollm.post(GENERATE + "_stream", {**body, "stream": True})
    events = sse_events(raw)
    assert status == 200 and len(events) > 1
    assert all(e["finish_reason"] == "" for e in events[:-1]) and events[-1]["finish_reason"] == answer["finish_reason"]
    # Greedy: the streamed deltas add up to the one-shot answer.
    assert "".join(e["text_output"] for e in events) == answer["text_output"]
    assert triton_smollm.metric("nv_inference_request_success") - before == 2
    assert triton_smollm.metric("dsa_triton_generated_tokens_total") >= 2 * answer["completion_tokens"]
    assert triton_smollm.metric("dsa_triton_time_to_first_token_seconds_count") >= 2


def test_grpc_streaming_with_tritonclient(triton_smollm: RunningTriton) -> None:
    inputs = grpc_inputs(text_input="Name a sorting algorithm.", max_tokens=6, temperature=0.0, stream=True)
    deltas, reason = grpc_stream(triton_smollm.grpc_url, inputs, request_id="grpc-1")
    assert len(deltas) > 1 and "".join(deltas).strip() and reason in ("stop", "length")


def test_grpc_cancel_mid_stream_frees_the_engine_request(triton_smollm: RunningTriton) -> None:
    aborted_before = triton_smollm.metric("dsa_triton_aborted_requests_total")
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_smollm.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = grpc_inputs(text_input="Tell me a long story about trees.", max_tokens=64, stream=True, temperature=0.0)
    client.async_stream_infer(MODEL, inputs, request_id="cancel-me")
    for _ in range(2):  # mid-stream: two deltas arrived
        result, error = responses.get(timeout=120)
        assert error is None and result.as_numpy("finish_reason").reshape(-1)[0] == b""
    assert triton_smollm.metric("dsa_triton_running_requests") == 1
    deadline = time.monotonic() + 5  # the engine's own count is copied into metrics every 0.5 s
    while triton_smollm.metric("dsa_triton_engine_running_requests") != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert triton_smollm.metric("dsa_triton_engine_running_requests") == 1
    client.stop_stream(cancel_requests=True)
    client.close()
    triton_smollm.wait_idle()
    assert triton_smollm.metric("dsa_triton_running_requests") == 0
    assert triton_smollm.metric("dsa_triton_engine_running_requests") == 0  # the engine itself let it go
    assert triton_smollm.metric("dsa_triton_aborted_requests_total") == aborted_before + 1


def test_eight_concurrent_requests_are_batched_by_the_engine(triton_smollm: RunningTriton) -> None:
    """max_batch_size 0 (no batch dimension, as vllm_backend): Triton hands each request over at once and the
    engine's scheduler runs the concurrent ones in one batch per step (its own running count, published by the model,
    goes above 1)."""
    requests_before = triton_smollm.metric("nv_inference_request_success")
    barrier = threading.Barrier(8)
    done = threading.Event()
    peak = 0.0

    def one(i: int) -> dict:
        barrier.wait()
        body = {"text_input": f"Count to {i}.", "max_tokens": 12, "ignore_eos": True}
        status, raw = triton_smollm.post(GENERATE, body, timeout=600)  # 2 shared cores can be very busy
        assert status == 200, raw
        return json.loads(raw)

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, triton_smollm.metric("dsa_triton_engine_running_requests"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
    finally:
        done.set()
        watcher.join()
    assert all(a["completion_tokens"] == 12 for a in answers)
    assert triton_smollm.metric("nv_inference_request_success") - requests_before == 8
    assert peak >= 2, f"the engine never ran more than {peak} request(s) at once: not batched"


def _png_b64(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("body", "status", "prefix"),
    [
        ({"max_tokens": 4}, 400, "400 invalid_request: one of the inputs"),
        ({"text_input": "hi", "image": ["%%% not base64"]}, 400, "400 invalid_request: image: invalid base64"),
        ({"text_input": "hi", "image": [(7000, 6000)]}, 400, "413 payload_too_large: image: 7000x6000"),
        ({"text_input": "hi", "image": [(8, 8)]}, 400, "400 unsupported_input"),
        ({"text_input": "hi", "temperature": 9.0}, 400, "422 validation_error: temperature"),
        ({"messages": "[{]"}, 400, "400 invalid_request: messages: invalid JSON"),
    ],
)
def test_bad_requests_get_error_responses_and_the_model_stays_ready(
    triton_smollm: RunningTriton, body: dict, status: int, prefix: str
) -> None:
    if isinstance(body.get("image", [""])[0], tuple):  # built here, not at collection: a 42-megapixel PNG
        body = {**body, "image": [_png_b64(size) for size in body["image"]]}
    got, raw = triton_smollm.post(GENERATE, body)
    assert got == status, raw
    assert json.loads(raw)["error"].startswith(prefix), raw
    assert triton_smollm.get(f"/v2/models/{MODEL}/ready")[0] == 200


def test_wrong_dtype_is_refused_by_triton_and_the_model_stays_ready(triton_smollm: RunningTriton) -> None:
    client = grpcclient.InferenceServerClient(triton_smollm.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        bad = grpcclient.InferInput("max_tokens", [1], "FP32")
        bad.set_data_from_numpy(np.array([4.0], dtype=np.float32))
        client.async_stream_infer(MODEL, [*grpc_inputs(text_input="hi"), bad])
        result, error = responses.get(timeout=60)
        assert result is None and "data-type is 'FP32'" in error.message()
        assert isinstance(proto.error_from_message(error.message()), proto.errors.InvalidRequestError)
    finally:
        client.stop_stream()
        client.close()
    status, raw = triton_smollm.post(GENERATE, {"text_input": "Still there?", "max_tokens": 2})
    assert status == 200 and json.loads(raw)["completion_tokens"] > 0
