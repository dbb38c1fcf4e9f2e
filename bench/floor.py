"""The physical floor: this machine's memory bandwidth and matmul rate, turned into the best possible decode tok/s.

A decode step must read every weight once (memory-bound at small batch) and do 2 FLOPs per weight per sequence
(compute-bound at large batch). So the best step time at batch B is
max(weight_bytes / bandwidth, 2 * params * B / flops), and the floor's tok/s is B / step time. KV-cache reads are left
out (small for 64-token requests), so the floor is a little optimistic: a fraction of it is an honest efficiency.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class MachineFloor:
    read_gb_s: float
    matmul_fp32_gflops: float
    matmul_bf16_gflops: float

    def as_dict(self) -> dict:
        return asdict(self)


def _best_of(fn, repeats: int = 5) -> float:
    fn()  # warm-up (allocations, thread pool)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_read_bandwidth(gib: float = 1.0) -> float:
    """GB/s reading a large tensor once (a multi-threaded sum: one load per element, little arithmetic)."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)
    seconds = _best_of(lambda: x.sum())
    return x.numel() * 4 / seconds / 1e9


def measure_matmul(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of an n x n matmul in `dtype`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    seconds = _best_of(lambda: torch.mm(a, b), repeats=3)
    return 2 * n**3 / seconds / 1e9


def measure_machine() -> MachineFloor:
    return MachineFloor(
        read_gb_s=round(measure_read_bandwidth(), 2),
        matmul_fp32_gflops=round(measure_matmul(torch.float32), 1),
        matmul_bf16_gflops=round(measure_matmul(torch.bfloat16), 1),
    )


def model_floor_tok_s(params: int, bytes_per_param: float, batch: int, machine: MachineFloor, bf16: bool) -> float:
    """Best possible aggregate decode tok/s at `batch` sequences for a model of `params` parameters."""
    flops = (machine.matmul_bf16_gflops if bf16 else machine.matmul_fp32_gflops) * 1e9
    step = max(params * bytes_per_param / (machine.read_gb_s * 1e9), 2 * params * batch / flops)
    return batch / step


def count_params(folder: str) -> int:
    """Parameters of a safetensors folder, read from the file headers (no weights loaded)."""
    import json
    import struct
    from math import prod
    from pathlib import Path

    total = 0
    for f in Path(folder).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total
