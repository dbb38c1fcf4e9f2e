"""Helpers of the session engine fixtures (tests/conftest.py, tests/engine/conftest.py): start, yield, shut down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from agent.config import DType, Quantization
from agent.engine.spec import EngineSpec


@asynccontextmanager
async def started(engine) -> AsyncIterator:
    """`engine`, started for the block and shut down after it (also when the session ends on an error)."""
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


def tiny_vl_spec(folder: Path, dtype: DType, device: str = "cpu") -> EngineSpec:
    """The tiny Qwen3-VL's spec: batches of 8 and a small pixel budget, so image tests stay fast."""
    return EngineSpec(
        folder=folder,
        name="tiny-qwen3-vl",
        dtype=dtype,
        quantization=Quantization.none,
        max_batch_size=8,
        image_max_pixels=256 * 256,
        device=device,
    )
