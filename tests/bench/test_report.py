"""Results: the ratios and floor fractions the issue's targets are stated in are computed from the figures of the
run (never typed), and the JSON, Markdown and plot are written."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench import report
from bench.floor import FORMATS, MachineFloor, compute_floor_tok_s
from bench.workloads import random_workload, tutor_workload

MACHINE = MachineFloor(
    read_gb_s=40.0, matmul_fp32_gflops=200.0, matmul_bf16_gflops=800.0, matmul_int8_gops=1600.0, cpu="Test CPU",
    cores=2, flags=["avx2", "avx512_bf16"],
)  # fmt: skip
PARAMS = 100_000_000


def _rows(tok_s_at_1: float, tok_s_at_32: float, ttft_at_1: float = 10.0, e2e_at_1: float = 1.0) -> list[dict]:
    def row(c: int, tok_s: float, ttft: float, e2e: float) -> dict:
        return {
            "concurrency": c, "repeats": 3, "requests": 4 * c, "errors": 1 if c == 32 else 0, "wall_s": 1.0,
            "tokens": 64, "tok_per_s": tok_s, "req_per_s": 1.0, "ttft_p50_ms": ttft, "ttft_p95_ms": ttft * 2,
            "itl_p50_ms": 5.0, "e2e_p50_s": e2e, "client_cpu_s": 0.2,
        }  # fmt: skip

    return [row(1, tok_s_at_1, ttft_at_1, e2e_at_1), row(32, tok_s_at_32, 100.0, 3.0)]


def _result() -> dict:
    figures = {
        "random": {
            "fastapi/onnx_int4": _rows(200.0, 600.0, ttft_at_1=10.0, e2e_at_1=0.40),
            "gateway/onnx_int4": _rows(180.0, 570.0, ttft_at_1=14.0, e2e_at_1=0.44),
            "llama_server": _rows(100.0, 300.0),
            "vllm_serve": _rows(50.0, 500.0),
        },
        "tutor": {"gateway/onnx_int4": _rows(150.0, 900.0), "llama_server": _rows(100.0, 450.0)},
    }
    inprocess = {"random": {"inprocess/onnx_int4": _rows(210.0, 650.0)}}
    args = argparse.Namespace(
        tokens=64, prompt_tokens=128, levels=[1, 32], repeats=3, per_level=2, min_requests=12,
        workload_list=[random_workload(), tutor_workload()],
    )  # fmt: skip
    settings = {"dtype": "bfloat16", "shipped": "gateway/onnx_int4"}
    return report.assemble(MACHINE, PARAMS, figures, inprocess, [], args, settings)


def test_ratios_are_taken_within_the_run() -> None:
    r = _result()["ratios"]
    assert r["shipped"] == "gateway/onnx_int4"
    assert r["shipped_vs_llama_server_at_1"] == 1.8 and r["shipped_vs_llama_server_at_32"] == 1.9
    assert r["shipped_vs_vllm_serve_at_1"] == 3.6 and r["shipped_vs_vllm_serve_at_32"] == 1.14
    assert r["gateway_overhead_at_1"] == 0.1  # 180 tok/s through the gateway against 200 in-process
    assert r["gateway_overhead_at_32"] == 0.05  # 570 against 600
    assert r["gateway_itl_overhead_ms_at_1"] == 0.0
    assert r["gateway_ttft_overhead_ms_at_1"] == 4.0
    assert r["vs_llama_server_at_32.fastapi/onnx_int4"] == 2.0


def test_each_workload_has_its_own_ratios() -> None:
    tutor = _result()["by_workload"]["tutor"]["ratios"]
    assert tutor["shipped_vs_llama_server_at_32"] == 2.0 and tutor["gateway_overhead_at_1"] is None


def test_floor_fractions_use_each_targets_own_format() -> None:
    result = _result()
    f, floors = result["floor_fraction"], result["floor"]["targets"]
    int4_compute = compute_floor_tok_s(PARAMS, FORMATS["int4"], MACHINE)  # int8 dot products: 1600 GOP/s
    assert math.isclose(int4_compute, 8000.0)
    assert f["shipped_at_32"] == round(570.0 / 8000.0, 3)
    # At 1 against the bandwidth floor of int4 weights: 40 GB/s / (1e8 params x 0.625 bytes) = 640 tok/s.
    assert floors["gateway/onnx_int4"]["bandwidth_floor_tok_s"] == 640.0
    assert f["shipped_at_1"] == round(180.0 / 640.0, 3)
    assert floors["vllm_serve"]["compute"] == "bf16" and floors["vllm_serve"]["bandwidth_floor_tok_s"] == 200.0
    assert floors["llama_server"]["format"] == "gguf" and floors["llama_server"]["compute"] == "int8"
    assert f["inprocess/onnx_int4"]["at_32_of_compute"] == round(650.0 / 8000.0, 3)


def test_the_result_records_machine_and_settings() -> None:
    result = _result()
    assert result["machine"]["cpu"] == "Test CPU" and result["machine"]["flags"] == ["avx2", "avx512_bf16"]
    assert result["settings"]["dtype"] == "bfloat16" and result["settings"]["levels"] == [1, 32]
    assert result["workloads"]["tutor"]["prefix_reuse"] and not result["workloads"]["random"]["prefix_reuse"]
    json.dumps(result)  # serialisable as it is


def test_markdown_plot_and_json_are_written(tmp_path: Path) -> None:
    result = _result()
    paths = report.write(result, tmp_path, "stamp")
    assert [p.name for p in paths] == ["stamp.json", "stamp.md", "stamp.png"]
    assert json.loads(paths[0].read_text())["ratios"] == result["ratios"]
    text = paths[1].read_text()
    assert "ONNX int4 · `make run`: FastAPI /v1 -> Triton gRPC" in text and "llama.cpp llama-server (peer)" in text
    assert "In-process reference" in text and "| 1 |" in text  # errors column: one error at 32
    assert paths[2].stat().st_size > 1000
