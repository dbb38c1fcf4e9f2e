"""SmolLM2 served by the vLLM engine inside real Triton (its own server: vLLM takes ~30-90 s to start on CPU)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.triton.triton_fixtures import (
    MODEL,
    RunningTriton,
    acquire,
    grpc_inputs,
    grpc_stream,
    release,
    smollm_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.triton, pytest.mark.vllm]


@pytest.fixture(scope="module")
def triton_vllm(smollm_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTriton]:
    pytest.importorskip("vllm")
    env = smollm_env(smollm_folder) | {
        "LOADING_STRATEGY": "vllm",
        "DTYPE": "auto",
        "VLLM_ENFORCE_EAGER": "true",
        "VLLM_MAX_MODEL_LEN": "2048",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    running = acquire("vllm", env, tmp_path_factory.mktemp("triton-vllm"))
    try:
        yield running
    finally:
        release("vllm")


def test_vllm_engine_serves_inside_triton(triton_vllm: RunningTriton) -> None:
    info = [line for line in triton_vllm.metrics().splitlines() if line.startswith("dsa_triton_model_info{")]
    assert any('engine="vllm"' in line and line.endswith(" 1") for line in info), info

    body = {"text_input": "What is a binary tree?", "max_tokens": 8, "temperature": 0.0}
    status, raw = triton_vllm.post(f"/v2/models/{MODEL}/generate", body)
    answer = json.loads(raw)
    assert status == 200 and answer["text_output"].strip() and answer["completion_tokens"] > 0, raw

    inputs = grpc_inputs(text_input="What is a binary tree?", max_tokens=8, temperature=0.0, stream=True)
    deltas, _ = grpc_stream(triton_vllm.grpc_url, inputs)
    assert "".join(deltas) == answer["text_output"]  # greedy: streamed over gRPC == one-shot over HTTP
    assert triton_vllm.metric("nv_inference_request_success") == 2
