"""Clients written for NVIDIA's vllm_backend talk to `qwen3-vl` unchanged (real Triton, SmolLM2).

The requests are built as vllm_backend's own sample client, genai-perf's vLLM converter and vllm_backend's README
build them: batch-less `[1]` tensors, `sampling_parameters` as a JSON string whose numbers are strings,
`exclude_input_in_output`, and over HTTP the `parameters` object of `generate`.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from agent.serving.triton import protocol as proto
from tests.serving.triton import triton_fixtures
from tests.serving.triton.triton_fixtures import MODEL, RunningTriton

triton_smollm = triton_fixtures.triton_smollm  # the session's shared server (see triton_fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.triton]

GENERATE = f"/v2/models/{MODEL}/generate"


def vllm_request(prompt: str, stream: bool, sampling: dict[str, str], exclude: bool | None = None) -> list:
    """The tensors vllm_backend's samples/client.py sends: shape [1], no batch dimension."""
    arrays = {
        proto.TEXT_INPUT: np.array([prompt.encode()], dtype=np.object_),
        proto.STREAM: np.array([stream], dtype=bool),
        proto.SAMPLING_PARAMETERS: np.array([json.dumps(sampling).encode()], dtype=np.object_),
    }
    if exclude is not None:  # genai-perf adds it
        arrays[proto.EXCLUDE_INPUT_IN_OUTPUT] = np.array([exclude], dtype=bool)
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, [1], proto.INPUT_DATATYPES[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def stream_all(url: str, inputs: list, **infer: object) -> list[tuple[object, object]]:
    """Every (result, error) of one streamed request, up to the final response."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    out = []
    try:
        client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True, **infer)
        while True:
            result, error = responses.get(timeout=120)
            out.append((result, error))
            if error is not None:
                return out
            final = result.get_response().parameters.get("triton_final_response")
            if final and final.bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def texts(responses: list[tuple[object, object]]) -> list[str]:
    return [
        r.as_numpy("text_output").reshape(-1)[0].decode() for r, _ in responses if r.as_numpy("text_output") is not None
    ]


def completion_tokens(responses: list[tuple[object, object]]) -> list[int]:
    return [
        int(r.as_numpy("completion_tokens").reshape(-1)[0])
        for r, _ in responses
        if r.as_numpy("text_output") is not None
    ]


def test_vllm_sample_client_over_grpc_streams(triton_smollm: RunningTriton) -> None:
    """vllm_backend samples/client.py: sampling values as strings, sent as a tensor and as request parameters."""
    sampling = {"temperature": "0.1", "top_p": "0.95", "max_tokens": "8"}
    inputs = vllm_request("What is a stack?", True, sampling)
    responses = stream_all(triton_smollm.grpc_url, inputs, request_id="7", parameters=sampling)
    assert all(error is None for _, error in responses), responses[-1][1]
    deltas = texts(responses)
    assert len(deltas) > 1 and "".join(deltas).strip()
    assert 0 < completion_tokens(responses)[-1] <= 8


def test_genai_perf_vllm_payload_over_grpc_gives_exactly_max_tokens(triton_smollm: RunningTriton) -> None:
    """genai-perf's vLLM converter: exclude_input_in_output [true], stream [true], max_tokens = min_tokens as
    strings: exactly that many tokens come back."""
    inputs = vllm_request("Hi", True, {"max_tokens": "12", "min_tokens": "12"}, exclude=True)
    responses = stream_all(triton_smollm.grpc_url, inputs)
    assert all(error is None for _, error in responses), responses[-1][1]
    counts = completion_tokens(responses)
    assert counts[-1] == 12 and len(texts(responses)) > 1


def test_vllm_unknown_sampling_key_is_a_clear_422(triton_smollm: RunningTriton) -> None:
    inputs = vllm_request("Hi", False, {"max_tokens": "4", "top_k": "5"})
    responses = stream_all(triton_smollm.grpc_url, inputs)
    error = responses[-1][1]
    assert error is not None and "422 validation_error: sampling_parameters: unsupported key(s) ['top_k']" in str(error)


def test_vllm_readme_http_generate_with_parameters(triton_smollm: RunningTriton) -> None:
    """vllm_backend's README: `generate` with a `parameters` object (stream goes to its tensor, the rest are request
    parameters); and `exclude_input_in_output: false` puts the input before the answer."""
    body = {"text_input": "What is Triton?", "parameters": {"stream": False, "temperature": 0, "max_tokens": 5}}
    status, raw = triton_smollm.post(GENERATE, body)
    assert status == 200, raw
    answer = json.loads(raw)
    assert 0 < answer["completion_tokens"] <= 5 and answer["text_output"].strip()

    echoed = {**body, "exclude_input_in_output": False}
    status, raw = triton_smollm.post(GENERATE, echoed)
    assert status == 200, raw
    assert json.loads(raw)["text_output"] == "What is Triton?" + answer["text_output"]  # greedy: the same answer


def test_vllm_http_generate_stream_with_sampling_parameters_string(triton_smollm: RunningTriton) -> None:
    body = {
        "text_input": "Name a tree.",
        "stream": True,
        "exclude_input_in_output": True,
        "sampling_parameters": json.dumps({"max_tokens": "6", "min_tokens": "6", "temperature": "0"}),
    }
    status, raw = triton_smollm.post(GENERATE + "_stream", body)
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and len(events) > 1, raw
    assert events[-1]["completion_tokens"] == 6 and events[-1]["finish_reason"] == "length"
    status, raw = triton_smollm.post(GENERATE, {"text_input": "x", "sampling_parameters": '{"max_tokens": "99999"}'})
    assert status == 400 and "422 validation_error: max_tokens" in raw.decode()


def _perf_analyzer() -> str | None:
    """The perf_analyzer binary (deploy/install-perf-analyzer.sh puts it in the venv; PERF_ANALYZER overrides)."""
    found = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent)) or shutil.which("perf_analyzer")
    return os.environ.get("PERF_ANALYZER") or found


def test_perf_analyzer_with_vllm_input_data(triton_smollm: RunningTriton, tmp_path: Path) -> None:
    """The real perf_analyzer, fed genai-perf's vLLM input data, runs against the door with no errors."""
    binary = _perf_analyzer()
    assert binary, "perf_analyzer not found: run deploy/install-tools.sh (make test does)"
    sampling = json.dumps({"max_tokens": "8", "min_tokens": "8"})
    data = {
        "data": [
            {
                "text_input": [prompt],
                "exclude_input_in_output": [True],
                "stream": [True],
                "sampling_parameters": [sampling],
            }
            for prompt in ("What is a heap?", "Explain recursion.")
        ]
    }
    (tmp_path / "inputs.json").write_text(json.dumps(data))
    cmd = [binary, "-m", MODEL, "-u", triton_smollm.grpc_url, "-i", "grpc", "--streaming"]
    cmd += ["--input-data", str(tmp_path / "inputs.json"), "--concurrency-range", "2"]
    cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", "4", "-f", str(tmp_path / "pa.csv")]
    # One window is the measurement: a stable throughput is not what this test checks (2 cores, shared).
    cmd += ["--stability-percentage", "1000", "--max-trials", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "error" not in (run.stdout + run.stderr).lower()
    assert (tmp_path / "pa.csv").read_text().strip()
