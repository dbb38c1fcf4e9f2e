"""The benchmark harness measures what it says: counts, percentiles, the floor model (no timings asserted)."""

from __future__ import annotations

import math

from agent.engine.fake import FakeEngine
from bench.floor import MachineFloor, model_floor_tok_s
from bench.load import InProcessEngine, RequestSample, run_level, summarize


async def test_level_counts_every_token_and_request() -> None:
    engine = FakeEngine()
    await engine.start()
    client = InProcessEngine(engine, tokens=3)
    result = await run_level(client, concurrency=4, requests=10)
    assert (result.requests, result.errors, result.concurrency) == (10, 0, 4)
    assert result.tokens == 30  # FakeEngine echoes > 3 words, so every request stops at max_new_tokens
    assert result.tok_per_s > 0 and result.ttft_p50_ms <= result.ttft_p95_ms


async def test_failed_requests_are_counted_not_raised() -> None:
    async def flaky(i: int) -> RequestSample:
        if i % 2:
            raise RuntimeError("boom")
        return RequestSample(ttft=0.1, e2e=0.2, tokens=5, gaps=[0.01])

    result = await run_level(flaky, concurrency=2, requests=6)
    assert (result.requests, result.errors, result.tokens) == (3, 3, 15)


def test_summary_percentiles() -> None:
    samples = [RequestSample(ttft=t / 1000, e2e=1.0, tokens=10, gaps=[0.02, 0.04]) for t in range(1, 101)]
    result = summarize(8, samples, errors=0, wall=2.0)
    assert result.tok_per_s == 500.0 and result.req_per_s == 50.0
    assert math.isclose(result.ttft_p50_ms, 51.0, abs_tol=1.0) and math.isclose(result.ttft_p95_ms, 95.0, abs_tol=1.0)
    assert math.isclose(result.itl_p50_ms, 30.0)


def test_floor_is_memory_bound_at_batch_1_and_compute_bound_at_large_batch() -> None:
    machine = MachineFloor(read_gb_s=20.0, matmul_fp32_gflops=100.0, matmul_bf16_gflops=400.0)
    params = 100_000_000  # 200 MB in bf16: 10 ms per step at 20 GB/s
    assert math.isclose(model_floor_tok_s(params, 2, 1, machine, bf16=True), 100.0)
    # batch 64: 2 * 1e8 * 64 FLOPs = 12.8 GFLOP at 400 GFLOP/s = 32 ms > 10 ms read time
    assert math.isclose(model_floor_tok_s(params, 2, 64, machine, bf16=True), 64 / 0.032)
