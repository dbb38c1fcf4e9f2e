"""The physical floor: this machine's memory bandwidth and matmul rate, turned into the best possible decode tok/s.

A decode step must read every weight once (memory-bound at small batch) and do 2 FLOPs per weight per sequence
(compute-bound at large batch). So the best step time at batch B is
max(weight_bytes / bandwidth, 2 * params * B / flops), and the floor's tok/s is B / step time. KV-cache reads are left
out (small for 64-token requests), so the floor is a little optimistic: a fraction of it is an honest efficiency.

Each target is held to the floor of its own weights: at concurrency 1 against the bandwidth floor for its weight
bytes (int4 moves fewer bytes than bf16), at 32 against the compute floor of the arithmetic its kernels use (int8
dot products for ONNX int4/int8 and llama.cpp's Q4_1, which quantize activations to 8 bits; bf16 or fp32 otherwise).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from agent.engine.cpu import cpu_features, usable_cores

# The instruction sets recorded with the floor: they decide which kernels each engine runs (agent/engine/cpu.py).
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


@dataclass
class MachineFloor:
    read_gb_s: float
    matmul_fp32_gflops: float
    matmul_bf16_gflops: float
    matmul_int8_gops: float | None = None  # None where torch has no CPU int8 matmul
    cpu: str = ""
    cores: int = 0
    flags: list[str] = field(default_factory=list)  # the flags that matter to the engines (agent.engine.cpu)

    def rate(self, compute: str) -> float:
        """Operations per second of the arithmetic `compute` (int8, bf16, fp32); int8 falls back to bf16's rate."""
        gops = {"fp32": self.matmul_fp32_gflops, "bf16": self.matmul_bf16_gflops, "int8": self.matmul_int8_gops}
        return (gops.get(compute) or self.matmul_bf16_gflops) * 1e9

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


def measure_int8_matmul(n: int = 2048) -> float | None:
    """GOP/s of an n x n int8 x int8 -> int32 matmul (`torch._int_mm`: oneDNN's VNNI/AMX kernels), or None."""
    int_mm = getattr(torch, "_int_mm", None)
    if int_mm is None:
        return None
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    try:
        seconds = _best_of(lambda: int_mm(a, b), repeats=3)
    except RuntimeError:  # no CPU kernel in this torch build
        return None
    return 2 * n**3 / seconds / 1e9


def measure_machine() -> MachineFloor:
    cpu = cpu_features()
    int8 = measure_int8_matmul()
    return MachineFloor(
        read_gb_s=round(measure_read_bandwidth(), 2),
        matmul_fp32_gflops=round(measure_matmul(torch.float32), 1),
        matmul_bf16_gflops=round(measure_matmul(torch.bfloat16), 1),
        matmul_int8_gops=None if int8 is None else round(int8, 1),
        cpu=cpu.model,
        cores=usable_cores(),
        flags=[f for f in FLAGS if f in cpu.flags],
    )


@dataclass(frozen=True)
class WeightFormat:
    """How a target holds the weights: bytes read per parameter per decode step, and the arithmetic it runs."""

    name: str
    bytes_per_param: float
    compute: str  # "int8", "bf16" or "fp32"


# Blocked formats carry one fp32 scale per block (ONNX MatMulNBits: int4 blocks of 32, int8 blocks of 128;
# docs/onnx.md); GGUF files mix types per tensor, so llama-server's bytes are taken from the file (gguf_format).
FORMATS = {
    "int4": WeightFormat("int4 (blocks of 32)", 0.5 + 4 / 32, "int8"),
    "int8": WeightFormat("int8 (blocks of 128)", 1 + 4 / 128, "int8"),
    "bf16": WeightFormat("bf16", 2.0, "bf16"),
    "fp32": WeightFormat("fp32", 4.0, "fp32"),
}


def gguf_format(file_bytes: int, params: int) -> WeightFormat:
    """A GGUF file's weights (Q4_1 blocks and whatever types its other tensors use), run on int8 dot products."""
    return WeightFormat("gguf", file_bytes / params, "int8")


def bandwidth_floor_tok_s(params: int, fmt: WeightFormat, machine: MachineFloor) -> float:
    """Best single-stream decode tok/s: one full read of the weights per token."""
    return machine.read_gb_s * 1e9 / (params * fmt.bytes_per_param)


def compute_floor_tok_s(params: int, fmt: WeightFormat, machine: MachineFloor) -> float:
    """Best aggregate decode tok/s when compute-bound: 2 operations per parameter per token at the format's rate."""
    return machine.rate(fmt.compute) / (2 * params)


def model_floor_tok_s(params: int, bytes_per_param: float, batch: int, machine: MachineFloor, bf16: bool) -> float:
    """Best possible aggregate decode tok/s at `batch` sequences for a model of `params` parameters."""
    flops = (machine.matmul_bf16_gflops if bf16 else machine.matmul_fp32_gflops) * 1e9
    step = max(params * bytes_per_param / (machine.read_gb_s * 1e9), 2 * params * batch / flops)
    return batch / step
