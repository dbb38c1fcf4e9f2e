"""The real Triton server for tests: started once per session on free ports, shared by every module that uses it.

Test modules import the fixtures they need (`from tests.serving.triton.triton_fixtures import triton_smollm`).
Modules in different folders each get a fixture definition of their own, so the servers are kept in a module-level
registry (started by the first user, stopped when the last session-scoped user is torn down): one server per kind per
session.
"""

from __future__ import annotations

import json
import queue
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from agent.serving.triton import protocol as proto
from agent.serving.triton.launcher import TritonConfig, TritonServer
from agent.serving.triton.metrics import parse_samples

MODEL = "qwen3-vl"
CONTROL_KEY = "test-control-key"  # the servers guard their model-control API as with API_KEYS set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningTriton:
    server: TritonServer
    prompt_log: Path
    log_path: Path
    users: int = 0

    @property
    def http_url(self) -> str:
        return self.server.cfg.http_url

    @property
    def grpc_url(self) -> str:
        return self.server.cfg.grpc_url

    def get(self, path: str) -> tuple[int, bytes]:
        """GET on the HTTP port: (status, body)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, body: dict, timeout: float = 120) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.server.cfg.metrics_url, timeout=10) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (model defaults to qwen3-vl)."""
        labels.setdefault("model", MODEL)
        samples = parse_samples(self.metrics(), name)
        return sum(v for lab, v in samples if all(lab.get(k) == want for k, want in labels.items()))

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no request is running, by the model's count and by the engine's own count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (
            self.metric("dsa_triton_running_requests") or self.metric("dsa_triton_engine_running_requests")
        ):
            time.sleep(0.2)

    def prompts(self) -> list[dict]:
        """The rendered prompts the model logged (NEWBIE_TRITON_PROMPT_LOG), oldest first."""
        if not self.prompt_log.exists():
            return []
        return [json.loads(line) for line in self.prompt_log.read_text().splitlines() if line.strip()]


_RUNNING: dict[str, RunningTriton] = {}


def acquire(key: str, env: dict[str, str], workdir: Path) -> RunningTriton:
    """The server `key`, started on first use with `env` (engine settings) on free ports."""
    if key not in _RUNNING:
        workdir.mkdir(parents=True, exist_ok=True)
        prompt_log = workdir / "prompts.jsonl"
        cfg = TritonConfig(
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            exit_timeout=5,
            control_key=CONTROL_KEY,  # tests leave nothing in flight: do not wait 30 s at exit
            extra_env={**env, "NEWBIE_TRITON_PROMPT_LOG": str(prompt_log)},
        )
        server = TritonServer(cfg, log_path=workdir / "triton.log")
        server.start(timeout=600)
        _RUNNING[key] = RunningTriton(server, prompt_log, workdir / "triton.log")
    running = _RUNNING[key]
    running.users += 1
    return running


def release(key: str) -> None:
    running = _RUNNING.get(key)
    if running is None:
        return
    running.users -= 1
    if running.users <= 0:
        _RUNNING.pop(key).server.stop()


def smollm_env(folder: Path) -> dict[str, str]:
    """SmolLM2 on the transformers engine, fp32 and greedy by default: deterministic answers."""
    return {
        "MODEL_PATH": str(folder),
        "LOADING_STRATEGY": "transformers",
        "QUANTIZATION_TYPE": "none",
        "DTYPE": "float32",
        "DEVICE": "cpu",
        "MAX_BATCH_SIZE": "16",
        "MAX_NEW_TOKENS": "64",
        "TEMPERATURE": "0",
        "IMAGE_MAX_PIXELS": str(256 * 256),
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture(scope="session")
def triton_smollm(smollm_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTriton]:
    """Real Triton serving SmolLM2 through the transformers engine (the shipped model repository)."""
    running = acquire("smollm", smollm_env(smollm_folder), tmp_path_factory.mktemp("triton-smollm"))
    try:
        yield running
    finally:
        release("smollm")


def grpc_inputs(**values: object) -> list[grpcclient.InferInput]:
    """The model's inputs as tritonclient tensors, typed from agent.serving.triton.protocol ([1] per scalar: the
    model has max_batch_size 0, no batch dimension)."""
    out = []
    for name, value in values.items():
        array = value if isinstance(value, np.ndarray) else np.array([value], dtype=_dtype(name))
        tensor = grpcclient.InferInput(name, list(array.shape), proto.INPUT_DATATYPES[name])
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _dtype(name: str) -> type:
    return {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}[
        proto.INPUT_DATATYPES[name]
    ]


def grpc_stream(grpc_url: str, inputs: list[grpcclient.InferInput], **infer: object) -> tuple[list[str], str]:
    """One streamed request over gRPC with tritonclient: its text deltas and finish reason (errors fail the test)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, inputs, **infer)
        deltas, reason = [], ""
        while not reason:
            result, error = responses.get(timeout=120)
            assert error is None, error
            deltas.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
    finally:
        client.stop_stream()
        client.close()
    return deltas, reason
