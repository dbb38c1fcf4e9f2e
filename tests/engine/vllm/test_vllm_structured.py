"""Structured output on the vLLM engine: our constraint -> vLLM's StructuredOutputsParams, on the xgrammar backend
with compact JSON (the grammar our own engines compile); vLLM itself runs in the engine contract
(tests/engine/test_structured_contract.py)."""

from __future__ import annotations

import json
from pathlib import Path

from agent.engine.spec import EngineSpec
from agent.engine.types import OutputConstraint, SamplingParams
from agent.engine.vllm.engine import engine_kwargs, sampling_kwargs

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})


def test_constraints_become_structured_outputs() -> None:
    schema = sampling_kwargs(SamplingParams(constraint=OutputConstraint("json_schema", SCHEMA), ignore_eos=True))
    assert schema["structured_outputs"].json == SCHEMA
    assert schema["ignore_eos"] is False  # a completed grammar ends the answer, as in our engines
    obj = sampling_kwargs(SamplingParams(constraint=OutputConstraint("json_object")))
    assert obj["structured_outputs"].json_object is True
    free = sampling_kwargs(SamplingParams(ignore_eos=True))
    assert "structured_outputs" not in free and free["ignore_eos"] is True


def test_engine_uses_xgrammar_with_compact_json(tmp_path: Path) -> None:
    kwargs = engine_kwargs(EngineSpec(folder=tmp_path, name="m"), quantization_methods=[])
    assert kwargs["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
