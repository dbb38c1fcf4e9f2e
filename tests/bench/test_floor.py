"""The floor: this CPU's recorded facts, its int8 matmul rate, and the per-format floors targets are held to."""

from __future__ import annotations

import math

from bench.floor import (
    FORMATS,
    MachineFloor,
    bandwidth_floor_tok_s,
    compute_floor_tok_s,
    gguf_format,
    measure_int8_matmul,
)

MACHINE = MachineFloor(read_gb_s=50.0, matmul_fp32_gflops=100.0, matmul_bf16_gflops=400.0, matmul_int8_gops=900.0)


def test_int8_matmul_is_measured_on_this_cpu() -> None:
    gops = measure_int8_matmul(n=256)
    assert gops is None or gops > 0  # None only where torch has no CPU int8 matmul


def test_bandwidth_floor_reads_each_formats_bytes_once_per_token() -> None:
    params = 100_000_000
    assert math.isclose(bandwidth_floor_tok_s(params, FORMATS["bf16"], MACHINE), 250.0)
    assert math.isclose(bandwidth_floor_tok_s(params, FORMATS["int4"], MACHINE), 800.0)  # 0.625 bytes a weight
    assert math.isclose(bandwidth_floor_tok_s(params, gguf_format(70_000_000, params), MACHINE), 50e9 / 70e6)


def test_compute_floor_uses_the_arithmetic_the_kernels_run() -> None:
    params = 100_000_000
    assert math.isclose(compute_floor_tok_s(params, FORMATS["int8"], MACHINE), 4500.0)
    assert math.isclose(compute_floor_tok_s(params, FORMATS["fp32"], MACHINE), 500.0)
    no_int8 = MachineFloor(read_gb_s=50.0, matmul_fp32_gflops=100.0, matmul_bf16_gflops=400.0)
    assert math.isclose(compute_floor_tok_s(params, FORMATS["int4"], no_int8), 2000.0)  # bf16's rate instead
