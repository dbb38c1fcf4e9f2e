"""Structured output, part of the engine contract: every engine kind (tests/engine/conftest.py) on SmolLM2-135M, fp32
and greedy (batch invariance holds there: the shared fixtures are fp32)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from agent.engine.errors import InvalidRequestError
from agent.engine.structured.schema import SchemaLimits, check_schema
from agent.engine.types import GenerationRequest, Message, OutputConstraint, SamplingParams

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
CONSTRAINT = OutputConstraint("json_schema", check_schema(PERSON, SchemaLimits()))


# Engines that enforce a constraint; any other must refuse one (never answer unconstrained).
STRUCTURED_KINDS = ("transformers", "vllm", "onnx", "openvino")


@pytest.fixture
def engine_kind_structured(engine_kind: str) -> str:
    if engine_kind not in STRUCTURED_KINDS:
        pytest.skip(f"{engine_kind} refuses structured output (test_engines_without_it_refuse_it)")
    return engine_kind


async def test_engines_without_it_refuse_it(engine, engine_kind: str) -> None:
    if engine_kind in STRUCTURED_KINDS:
        pytest.skip(f"{engine_kind} enforces structured output (the tests below)")
    with pytest.raises(InvalidRequestError, match="structured output is not supported"):
        await engine.complete(ask("hi", CONSTRAINT))


def ask(text: str, constraint: OutputConstraint | None = None, **sampling: object) -> GenerationRequest:
    params = {"temperature": 0.0, "max_new_tokens": 24, "constraint": constraint, **sampling}
    return GenerationRequest(messages=(Message.text("user", text),), sampling=SamplingParams(**params))


async def test_constrained_answer_matches_the_schema(engine, engine_kind_structured: str) -> None:
    result = await engine.complete(ask("Describe Ann, 31, as JSON.", CONSTRAINT, max_new_tokens=32))
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), PERSON)
    obj = await engine.complete(ask("Any JSON object, please.", OutputConstraint("json_object"), max_new_tokens=12))
    assert obj.text.startswith("{")  # json_object: an object from the first character on


async def test_free_rows_beside_constrained_rows_get_the_same_tokens(engine, engine_kind_structured: str) -> None:
    free = [ask("What is a stack?", max_new_tokens=16, ignore_eos=True), ask("Name a sorting algorithm.")]
    alone = [await engine.complete(r) for r in free]
    constrained = [ask(f"Person {i} as JSON.", CONSTRAINT) for i in range(3)]
    mixed = await asyncio.gather(*[engine.complete(r) for r in [constrained[0], free[0], constrained[1], free[1]]])
    assert [mixed[1].text, mixed[3].text] == [a.text for a in alone]
    for result in (mixed[0], mixed[2]):
        jsonschema.validate(json.loads(result.text), PERSON)


async def test_max_tokens_cuts_json_short_with_length(engine, engine_kind_structured: str) -> None:
    result = await engine.complete(ask("Describe Bob as JSON.", CONSTRAINT, max_new_tokens=4))
    whole = await engine.complete(ask("Describe Bob as JSON.", CONSTRAINT, max_new_tokens=32))
    assert result.finish_reason == "length" and result.completion_tokens == 4
    assert result.text.startswith("{") and whole.text.startswith(result.text)  # what was generated, as generated
    assert whole.finish_reason == "stop" and len(whole.text) > len(result.text)


async def test_ignore_eos_stops_at_the_end_of_the_grammar(engine, engine_kind_structured: str) -> None:
    result = await engine.complete(ask("Describe Cy as JSON.", CONSTRAINT, max_new_tokens=40, ignore_eos=True))
    assert result.finish_reason == "stop" and result.completion_tokens < 40
    jsonschema.validate(json.loads(result.text), PERSON)


async def test_uncompilable_schema_is_refused(engine, engine_kind_structured: str) -> None:
    bad = OutputConstraint("json_schema", json.dumps({"$ref": "#/$defs/missing"}))
    with pytest.raises(InvalidRequestError):
        await engine.complete(ask("hi", bad))
