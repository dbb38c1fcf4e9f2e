"""Structured output on the OpenVINO engine: our grammar, in the pipeline's own (older) xgrammar.

The engine contract's structured tests (tests/engine/test_structured_contract.py) run on OpenVINO too; these add the
EBNF rewrite and schemas whose grammars use what the rewrite touches (unbounded repetition, `{m,}`, recursion,
tool-call lists), so a grammar the pipeline's parser would refuse (failing every request in its step) shows here.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import xgrammar as xgr
from PIL import Image

from agent.engine.errors import InvalidRequestError
from agent.engine.openvino.structured import openvino_ebnf
from agent.engine.structured.grammar import GrammarLimits
from agent.engine.structured.schema import SchemaLimits, check_schema
from agent.engine.types import GenerationRequest, ImagePart, Message, OutputConstraint, SamplingParams, TextPart


def test_unbounded_repetition_is_rewritten() -> None:
    assert openvino_ebnf('a ::= ("x"{0, -1} "y"{1, -1} "z"{3, -1} "w"{2, 4})') == 'a ::= ("x"* "y"+ "z"{3,} "w"{2, 4})'


def test_every_unbounded_form_of_a_real_grammar_is_rewritten() -> None:
    schema = {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "minItems": 3}, "minItems": 2}
    text = openvino_ebnf(str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)))
    assert "-1}" not in text


SCHEMAS = {
    "lists": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2}},
        "required": ["tags"],
    },
    "formats": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    "recursive": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["v"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "choices": {
        "type": "object",
        "properties": {"op": {"enum": ["push", "pop"]}, "n": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
        "required": ["op", "n"],
        "additionalProperties": False,
    },
    "tool_calls": {  # what tool_choice "required" asks for (agent.engine.structured.tools)
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"name": {"const": "draw_tree"}, "parameters": {"type": "object"}},
            "required": ["name", "parameters"],
        },
        "minItems": 1,
    },
}


def _ask(text: str, schema: dict, *, images: tuple = (), max_new_tokens: int = 48) -> GenerationRequest:
    constraint = OutputConstraint("json_schema", check_schema(schema, SchemaLimits()))
    parts = (*(ImagePart(i) for i in images), TextPart(text))
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, constraint=constraint)
    return GenerationRequest(messages=(Message("user", parts),), sampling=sampling)


@pytest.mark.slow
async def test_schemas_in_one_batch_give_valid_json(openvino_smollm_engine) -> None:
    requests = [_ask(f"Answer as JSON ({name}).", schema) for name, schema in SCHEMAS.items()]
    results = await asyncio.gather(*(openvino_smollm_engine.complete(r) for r in requests))
    for (name, schema), result in zip(SCHEMAS.items(), results, strict=True):
        if result.finish_reason == "stop":
            jsonschema.validate(json.loads(result.text), schema)
        else:  # cut by max_new_tokens (a recursive schema may run on): compact JSON from its first character
            assert result.finish_reason == "length" and result.text.startswith(("{", "[")), name
        assert " " not in result.text.split('"')[0]  # compact, as on every engine
    assert sum(r.finish_reason == "stop" for r in results) >= 3


@pytest.mark.slow
async def test_pattern_is_refused_by_name(openvino_smollm_engine) -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2,}[0-9]+$"}}}
    with pytest.raises(InvalidRequestError, match="`pattern` is not supported by LOADING_STRATEGY=openvino"):
        await openvino_smollm_engine.complete(_ask("hi", schema))


@pytest.mark.slow
async def test_a_compile_over_the_time_limit_is_refused(openvino_smollm_engine, monkeypatch) -> None:
    grammars = openvino_smollm_engine._loaded.grammars
    monkeypatch.setattr(grammars, "limits", GrammarLimits(compile_timeout_s=0.0))
    slow = {"type": "object", "properties": {"k": {"enum": [f"v{i}" for i in range(500)]}}}
    with pytest.raises(InvalidRequestError, match="GRAMMAR_COMPILE_TIMEOUT_S"):
        await openvino_smollm_engine.complete(_ask("hi", slow))
    await asyncio.sleep(0)
    assert openvino_smollm_engine.stats.running == 0


@pytest.mark.slow
async def test_an_image_request_with_a_schema(openvino_tiny_vl_engine) -> None:
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"]}
    result = await openvino_tiny_vl_engine.complete(
        _ask("Which color? JSON.", schema, images=(Image.new("RGB", (64, 64), "red"),), max_new_tokens=16)
    )
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), schema)
