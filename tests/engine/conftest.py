"""The `engine` fixture: one contract suite (test_contract.py) run against every engine kind.

Adding an engine to the contract is one line: append its kind to ENGINE_KINDS. Each kind maps to a session fixture
that yields a started engine on SmolLM2-135M (fp32, greedy-deterministic); the ones below build `VllmEngine(spec)` /
`OnnxEngine(spec)` from the shared `smollm_spec`, so the engine modules only need those constructors.
"""

from __future__ import annotations

import pytest

from tests.engines import started

ENGINE_KINDS = ["transformers", "vllm", "onnx", "openvino"]

# kind -> (session fixture yielding a started engine, extra pytest marks)
_ENGINE_FIXTURES: dict[str, tuple[str, tuple[pytest.MarkDecorator, ...]]] = {
    "transformers": ("smollm_engine", ()),
    "vllm": ("vllm_smollm_engine", (pytest.mark.vllm,)),
    "onnx": ("onnx_smollm_engine", ()),
    "openvino": ("openvino_smollm_engine", ()),
}


@pytest.fixture(scope="session")
async def vllm_smollm_engine(smollm_spec):
    from agent.engine.vllm.engine import VllmEngine

    async with started(VllmEngine(smollm_spec)) as engine:
        yield engine


@pytest.fixture(scope="session")
async def onnx_smollm_engine(smollm_spec):
    from agent.engine.onnx.engine import OnnxEngine

    async with started(OnnxEngine(smollm_spec)) as engine:
        yield engine


@pytest.fixture(scope="session")
async def openvino_smollm_engine(smollm_spec):
    """The OpenVINO engine on SmolLM2's fp32 export (exported once into the model cache by the export venv)."""
    from agent.engine.openvino.engine import OpenVinoEngine

    async with started(OpenVinoEngine(smollm_spec)) as engine:
        yield engine


@pytest.fixture(
    scope="session",
    params=[pytest.param(kind, marks=_ENGINE_FIXTURES[kind][1]) for kind in ENGINE_KINDS],
)
def engine_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def engine(engine_kind: str, request: pytest.FixtureRequest):
    """A started engine of `engine_kind` serving SmolLM2-135M-Instruct."""
    return request.getfixturevalue(_ENGINE_FIXTURES[engine_kind][0])
