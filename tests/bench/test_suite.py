"""The bench's targets and sweeps: a real HTTP door (FastAPI + uvicorn, the deterministic FakeEngine) driven by the
OpenAI client exactly as `make bench` drives a server, plus the choices made per CPU and per engine."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agent.config import load_settings
from agent.engine.cpu import CpuFeatures
from agent.engine.fake import FakeEngine
from agent.engine.types import GenerationRequest
from agent.serving.model_server import create_app
from bench import suite
from bench.load import OpenAIStream, RequestSample
from bench.targets import free_port, server
from bench.workloads import random_workload, tutor_workload
from tests.serving.live import serving


class RecordingEngine(FakeEngine):
    """FakeEngine that keeps every prompt it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []

    async def generate(self, request: GenerationRequest):  # type: ignore[override]
        self.prompts.append(request.messages[-1].text_content)
        async for chunk in super().generate(request):
            yield chunk


async def test_a_sweep_through_a_real_door_never_repeats_a_prompt(tmp_path: Path) -> None:
    engine = RecordingEngine()
    await engine.start()
    workload = random_workload(32)
    plan = suite.Plan(levels=[1, 3], repeats=2, per_level=2, tokens=5, workloads=[workload])
    async with serving(create_app(load_settings(history_db=tmp_path / "h.sqlite3"), engine)) as url:
        client = lambda: OpenAIStream(url, "fake", plan.tokens, workload)  # noqa: E731
        rows = await suite.sweep(client, plan, [1, 3], itertools.count())
    assert [r["concurrency"] for r in rows] == [1, 3]
    for row, requests in zip(rows, (4, 6), strict=True):  # at least 4 per level; 2 per client at 3
        assert (row["requests"], row["errors"], row["tokens"], row["repeats"]) == (requests, 0, requests * 5, 2)
        assert row["tok_per_s"] > 0 and row["client_cpu_s"] >= 0
    # 2 repeats x (1 warm-up + 4 + 6 requests): every prompt distinct, so no cache could have been hit.
    assert len(engine.prompts) == 22 and len(set(engine.prompts)) == 22


class Flaky:
    """A client whose every other request fails, after a warm-up that succeeds."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, i: int) -> RequestSample:
        self.calls += 1
        if self.calls % 2 == 0:
            raise RuntimeError("refused")
        return RequestSample(ttft=0.01, e2e=0.02, tokens=3, gaps=[0.005, 0.005])

    async def close(self) -> None:
        return None


async def test_failed_requests_are_counted_and_summed_over_repeats() -> None:
    plan = suite.Plan(levels=[2], repeats=2, per_level=2, tokens=3, workloads=[tutor_workload()])
    rows = await suite.sweep(Flaky, plan, [2], itertools.count())
    assert (rows[0]["requests"], rows[0]["errors"]) == (2, 4)  # per repeat 2 of 4 fail; errors add up


async def test_a_target_that_fails_its_warm_up_stops_the_run(tmp_path: Path) -> None:
    engine = FakeEngine()
    await engine.start()
    plan = suite.Plan(levels=[2], repeats=1, per_level=2, tokens=0, workloads=[tutor_workload()])
    async with serving(create_app(load_settings(history_db=tmp_path / "h.sqlite3"), engine)) as url:
        # max_tokens=0 is refused (422): a broken target stops loudly instead of reporting a table of errors.
        with pytest.raises(httpx.HTTPStatusError):
            await suite.sweep(lambda: OpenAIStream(url, "fake", 0, tutor_workload()), plan, [2], itertools.count())


def test_fastest_dtype_is_bf16_only_where_the_cpu_has_it() -> None:
    assert suite.fastest_dtype(CpuFeatures(frozenset({"avx2", "avx512f", "avx512_bf16"}))) == "bfloat16"
    assert suite.fastest_dtype(CpuFeatures(frozenset({"avx2", "amx_bf16"}))) == "bfloat16"
    assert suite.fastest_dtype(CpuFeatures(frozenset({"avx2", "fma"}))) == "float32"  # AMD Zen 3


def test_engine_env_and_weight_format() -> None:
    assert suite.engine_env("onnx_int8", "float32") == {"LOADING_STRATEGY": "onnx", "QUANTIZATION_TYPE": "int8"}
    assert suite.engine_env("onnx_fp32", "float32") == {"LOADING_STRATEGY": "onnx", "QUANTIZATION_TYPE": "none"}
    assert suite.weight_format("fastapi/onnx_fp32", "bfloat16") == "fp32"
    assert suite.engine_env("vllm", "float32")["DTYPE"] == "float32"
    assert suite.weight_format("gateway/onnx_int4", "bfloat16") == "int4"
    assert suite.weight_format("inprocess/onnx_int8", "bfloat16") == "int8"
    assert suite.weight_format("fastapi/vllm", "bfloat16") == "bf16"
    assert suite.weight_format("vllm_serve", "float32") == "fp32"
    assert suite.weight_format("llama_server", "float32") == "gguf"


def test_shipped_engine_is_what_auto_serves_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LOADING_STRATEGY", "QUANTIZATION_TYPE", "DTYPE", "MODEL_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert suite.shipped_engine() == "onnx_int4"  # the seed's QUANTIZATION_TYPE=int4 on CPU (model_loader)
    monkeypatch.setenv("QUANTIZATION_TYPE", "int8")
    assert suite.shipped_engine() == "onnx_int8"
    monkeypatch.setenv("LOADING_STRATEGY", "vllm")
    assert suite.shipped_engine() == "vllm"


def test_a_server_that_died_fails_its_target_and_keeps_no_figures(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    plan = suite.Plan(levels=[1], repeats=1, per_level=1, tokens=3, workloads=[tutor_workload()])
    figures: suite.Figures = {}
    failures: list[str] = []
    servers = [suite.Timed("fastapi/x", lambda w: Flaky, dead, tmp_path / "x.log")]
    suite._time_servers(figures, plan, servers, failures)
    assert figures == {} and len(failures) == 1 and "exited with 3" in failures[0]


def test_doors_are_timed_interleaved_and_a_dead_one_leaves_the_rotation(tmp_path: Path) -> None:
    order: list[str] = []

    def client_for(name: str, dies: subprocess.Popen | None = None):
        """Clients that log which target each sweep went to; `dies` is killed as its target's 2nd sweep ends."""

        class Client:
            async def __call__(self, i: int) -> RequestSample:
                return RequestSample(ttft=0.01, e2e=0.02, tokens=3, gaps=[0.005, 0.005])

            async def close(self) -> None:
                order.append(name)
                if dies is not None and order.count(name) == 2:
                    dies.kill()
                    dies.wait()

        return lambda w: Client

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    doomed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plan = suite.Plan(levels=[1], repeats=4, per_level=1, tokens=3, workloads=[tutor_workload()])
        figures: suite.Figures = {}
        failures: list[str] = []
        servers = [
            suite.Timed("a", client_for("a"), alive, tmp_path / "a.log"),
            suite.Timed("b", client_for("b", dies=doomed), doomed, tmp_path / "b.log"),
        ]
        suite._time_servers(figures, plan, servers, failures)
    finally:
        alive.kill()
    # A B, then B A (b dies after its second sweep: that sweep is not kept, b leaves), then a alone.
    assert order == ["a", "b", "b", "a", "a", "a"]
    rows = figures[tutor_workload().name]
    assert set(rows) == {"a"} and rows["a"][0]["repeats"] == 4
    assert len(failures) == 1 and failures[0].startswith("b: ")


def test_the_server_helper_yields_a_live_process_and_stops_its_group(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    with server(cmd, f"http://127.0.0.1:{port}/", {}, tmp_path / "http.log", timeout=60) as proc:
        assert proc.poll() is None
        suite._check_alive(proc, "http", tmp_path / "http.log")  # alive: no error
    assert proc.poll() is not None


def test_each_level_gets_fresh_prompts_and_enough_requests() -> None:
    from bench.suite import Plan, reserve_prompts

    plan = Plan(levels=[1, 4], repeats=1, per_level=2, tokens=8, workloads=[], min_requests=5)
    assert [plan.requests_at(c) for c in plan.levels] == [5, 8]  # 1 client: the minimum; 4 clients: 2 each
    numbers = iter(range(100))
    first = reserve_prompts(numbers, plan.requests_at(1))
    second = reserve_prompts(numbers, plan.requests_at(4))
    assert (first, second, next(numbers)) == (0, 5, 13)  # 0-4, then 5-12: no prompt sent at two levels
