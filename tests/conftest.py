"""Session-wide fixtures: the real small models, and one loaded engine shared by every test that needs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DType, Quantization, load_settings
from tests.engines import started, tiny_vl_spec


def pytest_addoption(parser: pytest.Parser) -> None:
    # The shared engines run on the CPU here and in CI; on a lent GPU machine the same suites run with
    # `--engine-device cuda` (tests/run-on-cuda.sh).
    parser.addoption("--engine-device", default="cpu", choices=("cpu", "cuda"), help="device of the shared engines")
    # fp32 by default: deterministic greedy output (batched == alone) and no slow bf16 warm-up on CPU.
    parser.addoption("--engine-dtype", default="float32", choices=("float32", "bfloat16"), help="their dtype")


@pytest.fixture(scope="session")
def engine_device(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--engine-device")


@pytest.fixture(scope="session")
def engine_dtype(request: pytest.FixtureRequest) -> DType:
    return DType(request.config.getoption("--engine-dtype"))


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    return load_settings().model_cache_dir


@pytest.fixture(scope="session")
def smollm_folder(model_cache_dir: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once to a safetensors folder."""
    from agent.engine.checkpoints import resolve_model

    return resolve_model(None, model_cache_dir).folder


@pytest.fixture(scope="session")
def tiny_vl_folder(model_cache_dir: Path) -> Path:
    """A tiny random Qwen3-VL (real architecture and processor), built offline once."""
    from agent.devtools.tiny_qwen3vl import build_tiny_qwen3vl

    return build_tiny_qwen3vl(model_cache_dir / "tiny-qwen3vl")


@pytest.fixture(scope="session")
def smollm_spec(smollm_folder: Path, engine_device: str, engine_dtype: DType):
    from agent.engine.spec import EngineSpec

    return EngineSpec(
        folder=smollm_folder,
        name="SmolLM2-135M-Instruct",
        dtype=engine_dtype,
        quantization=Quantization.none,
        max_batch_size=16,
        device=engine_device,
    )


@pytest.fixture(scope="session")
async def smollm_engine(smollm_spec):
    """One started transformers engine on SmolLM2 for the whole test session."""
    from agent.engine.transformers.engine import TransformersEngine

    async with started(TransformersEngine(smollm_spec)) as engine:
        yield engine


@pytest.fixture(scope="session")
async def tiny_vl_engine(tiny_vl_folder: Path, engine_device: str, engine_dtype: DType):
    """One started transformers engine on the tiny Qwen3-VL for the whole test session."""
    from agent.engine.transformers.engine import TransformersEngine

    async with started(TransformersEngine(tiny_vl_spec(tiny_vl_folder, engine_dtype, engine_device))) as engine:
        yield engine


@pytest.fixture(scope="session")
async def openvino_tiny_vl_engine(tiny_vl_folder, engine_dtype):
    """The OpenVINO engine on the tiny Qwen3-VL's fp32 export, with the same pixel budget as `tiny_vl_engine`."""
    from agent.engine.openvino.engine import OpenVinoEngine

    async with started(OpenVinoEngine(tiny_vl_spec(tiny_vl_folder, engine_dtype))) as engine:
        yield engine
