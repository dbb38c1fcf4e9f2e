"""NVIDIA's genai-perf, as deploy/install-genai-perf.sh installs it, against the Triton door of the stack `make run`
ships (`dsa-agent up`: gateway -> Triton -> ONNX int4 SmolLM2), with `qwen3-vl` unchanged:

- over gRPC, streaming: `genai-perf profile --service-kind triton --backend vllm` (its vLLM-backend requests:
  `[1]` tensors, `sampling_parameters` as a JSON string of string numbers, `exclude_input_in_output`);
- over HTTP: genai-perf 0.0.8 speaks only OpenAI's routes over HTTP, and Triton's KServe `infer` route refuses a
  decoupled model, so the same requests go to `generate_stream` through perf_analyzer's HTTP (`openai`) client.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import ROOT, require_tool, run_tool

from tests.serving.shipped_stack import StackProcess, shipped_stack  # noqa: F401 (fixture)

pytestmark = pytest.mark.deploy

SCRIPT = ROOT / "deploy" / "install-genai-perf.sh"
MODEL = "qwen3-vl"
OUTPUT_TOKENS = 16  # genai-perf sends max_tokens = min_tokens = this (--output-tokens-mean-deterministic)
CONCURRENCY = "2"  # within the shipped stack's test limits (MAX_CONCURRENT_REQUESTS=2)


def _venv() -> Path:
    default = Path.home() / ".cache" / "newbie-app" / "tools" / "genai-perf-0.0.8"
    return Path(os.environ.get("GENAI_PERF_VENV", default))


def test_scripts_are_shellcheck_clean() -> None:
    for script in (SCRIPT, ROOT / "deploy" / "install-perf-analyzer.sh"):
        proc = run_tool([require_tool("shellcheck"), str(script)])
        assert proc.returncode == 0, proc.stdout


def test_pinned_set_holds_the_version_the_script_installs() -> None:
    pins = (ROOT / "deploy" / "genai-perf-requirements.txt").read_text().splitlines()
    assert "genai-perf==0.0.8" in pins and "VERSION=0.0.8" in SCRIPT.read_text()
    assert all(line.startswith("#") or "==" in line for line in pins if line)  # every package pinned


@pytest.fixture(scope="module")
def genai_perf_run(shipped_stack: StackProcess, smollm_folder: Path, tmp_path_factory) -> Iterator[Path]:  # noqa: F811
    """One `genai-perf profile` over gRPC against the running door; its artifact folder."""
    venv = _venv()
    install = subprocess.run(["bash", str(SCRIPT), str(venv)], capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stdout + install.stderr
    artifacts = tmp_path_factory.mktemp("genai-perf")
    cmd = [str(venv / "bin" / "genai-perf"), "profile", "-m", MODEL, "--service-kind", "triton", "--backend", "vllm"]
    cmd += ["-u", shipped_stack.triton_grpc, "--streaming", "--concurrency", CONCURRENCY, "--num-prompts", "8"]
    cmd += ["--tokenizer", str(smollm_folder), "--synthetic-input-tokens-mean", "32"]
    cmd += ["--output-tokens-mean", str(OUTPUT_TOKENS), "--output-tokens-mean-deterministic"]
    cmd += ["--artifact-dir", str(artifacts)]
    cmd += ["--server-metrics-url", f"http://127.0.0.1:{shipped_stack.ports['metrics']}/metrics"]
    # After `--`, straight to perf_analyzer: windows of 4 requests, not of time, so a loaded machine cannot leave a
    # window empty; the run checks the interface, not a stable figure (docs/benchmarks.md has the figures' command).
    cmd += ["--", "--measurement-mode", "count_windows", "--measurement-request-count", "4", "--max-trials", "3"]
    # genai-perf finds perf_analyzer on PATH; the tokenizer is a local folder, nothing to fetch.
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=artifacts)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    yield artifacts


@pytest.mark.slow
@pytest.mark.triton
def test_genai_perf_over_grpc_streams_every_request(genai_perf_run: Path) -> None:
    figures = json.loads((genai_perf_run / "profile_export_genai_perf.json").read_text())
    assert figures["output_token_throughput"]["avg"] > 0
    assert figures["request_throughput"]["avg"] > 0
    assert figures["output_sequence_length"]["min"] == figures["output_sequence_length"]["max"] == OUTPUT_TOKENS
    assert 0 < figures["time_to_first_token"]["avg"] < figures["request_latency"]["avg"]
    assert figures["inter_token_latency"]["avg"] > 0
    # perf_analyzer's own record: every measured request streamed to `length` with no error response.
    export = json.loads((genai_perf_run / "profile_export.json").read_text())
    requests = [r for experiment in export["experiments"] for r in experiment["requests"]]
    assert export["service_kind"] == "triton" and requests
    for request in requests:
        outputs = request["response_outputs"]
        assert len(outputs) > 1 and all("error" not in out for out in outputs), outputs
        assert outputs[-1]["completion_tokens"] == OUTPUT_TOKENS and outputs[-1]["finish_reason"] == "length"


@pytest.mark.slow
@pytest.mark.triton
def test_the_same_requests_over_http_generate_stream(
    genai_perf_run: Path,
    shipped_stack: StackProcess,  # noqa: F811
) -> None:
    """genai-perf's inputs, one `generate_stream` body each, through perf_analyzer over HTTP: no errors."""
    rows = json.loads((genai_perf_run / "inputs.json").read_text())["data"]
    bodies = [{name: value[0] for name, value in row.items() if name != "model"} for row in rows]
    assert all(json.loads(body["sampling_parameters"])["max_tokens"] == str(OUTPUT_TOKENS) for body in bodies)
    data = genai_perf_run / "http-inputs.json"
    data.write_text(json.dumps({"data": [{"payload": [body]} for body in bodies]}))
    export_path = genai_perf_run / "http-export.json"
    cmd = [str(_venv() / "bin" / "perf_analyzer"), "-m", MODEL, "--async", "--service-kind", "openai", "-i", "http"]
    cmd += ["-u", shipped_stack.triton_http, "--endpoint", f"v2/models/{MODEL}/generate_stream"]
    cmd += ["--input-data", str(data), "--concurrency-range", CONCURRENCY, "--profile-export-file", str(export_path)]
    cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", "4"]
    cmd += ["--stability-percentage", "1000", "--max-trials", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    export = json.loads(export_path.read_text())
    requests = [r for experiment in export["experiments"] for r in experiment["requests"]]
    assert export["endpoint"] == f"v2/models/{MODEL}/generate_stream" and requests
    for request in requests:
        events = [
            json.loads(line[len("data: ") :])
            for out in request["response_outputs"]
            for line in out["response"].splitlines()
            if line.startswith("data: ")
        ]
        assert len(events) > 1 and all("error" not in event for event in events), events
        assert events[-1]["completion_tokens"] == OUTPUT_TOKENS and events[-1]["finish_reason"] == "length"
        assert "".join(event["text_output"] for event in events).strip()
