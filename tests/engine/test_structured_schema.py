"""JSON Schema checks before compiling (agent.engine.structured.schema): limits, keywords, response_format shapes."""

from __future__ import annotations

import json

import pytest

from agent.engine.errors import InvalidRequestError
from agent.engine.structured.schema import (
    SchemaLimits,
    check_schema,
    constraint_response_format,
    response_format_constraint,
)
from agent.engine.types import OutputConstraint

LIMITS = SchemaLimits(max_bytes=64 * 1024, max_depth=32, max_enum=1000)
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


def test_a_plain_schema_passes_and_keeps_its_key_order() -> None:
    text = check_schema(PERSON, LIMITS)
    assert json.loads(text) == PERSON and list(json.loads(text)["properties"]) == ["name", "age"]
    assert " " not in text  # compact: the cache key


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object", "not": {}}, "unsupported JSON Schema keyword 'not' at #"),
        ({"properties": {"a": {"if": {}, "then": {}}}}, "'if' at #/properties/a"),
        ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
        ({"type": "integer", "multipleOf": 3}, "'multipleOf'"),
        ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties'"),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf with more than one"),
        ({"type": "string", "pattern": "(abc"}, "invalid regular expression"),
        ({"type": "string", "pattern": "a(?!b)"}, "lookaround"),
        ({"type": "string", "pattern": r"(a)\1"}, "backreferences"),
        ({"enum": list(range(1001))}, "MAX_SCHEMA_ENUM=1000"),
        ({"enum": []}, "non-empty list"),
        (nested(33), "MAX_SCHEMA_DEPTH=32"),
        ({"type": "string", "description": "x" * (1 << 20)}, "MAX_SCHEMA_BYTES=65536"),
        ({"properties": []}, "object of schemas"),
        (True, "boolean schema"),
        ([], "must be a JSON object"),
    ],
)
def test_refused_schemas_name_the_problem(schema: object, message: str) -> None:
    with pytest.raises(InvalidRequestError, match="response_format.json_schema.schema") as err:
        check_schema(schema, LIMITS)
    assert message in err.value.message and err.value.status == 400


def test_limits_are_the_configured_ones() -> None:
    assert check_schema(nested(40), SchemaLimits(max_depth=40))
    assert check_schema({"enum": list(range(2000))}, SchemaLimits(max_enum=2000))
    with pytest.raises(InvalidRequestError, match="MAX_SCHEMA_BYTES=100"):
        check_schema(PERSON, SchemaLimits(max_bytes=100))


def test_a_schema_nested_past_python_recursion_is_a_400_not_a_crash() -> None:
    with pytest.raises(InvalidRequestError, match="MAX_SCHEMA_DEPTH"):
        check_schema(nested(5000), LIMITS)


def test_recursive_refs_and_pydantic_schemas_pass() -> None:
    tree = {"$defs": {"n": {"type": "object", "properties": {"k": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}}
    assert check_schema({**tree, "$ref": "#/$defs/n"}, LIMITS)
    from pydantic import BaseModel

    class Pet(BaseModel):
        kind: str
        legs: int | None = None

    class Owner(BaseModel):
        name: str
        pets: list[Pet]

    assert check_schema(Owner.model_json_schema(), LIMITS)


def test_response_format_shapes() -> None:
    assert response_format_constraint(None, LIMITS) is None
    assert response_format_constraint({"type": "text"}, LIMITS) is None
    assert response_format_constraint({"type": "json_object"}, LIMITS) == OutputConstraint("json_object")
    spec = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    constraint = response_format_constraint(spec, LIMITS)
    assert constraint == OutputConstraint("json_schema", check_schema(PERSON, LIMITS))
    assert response_format_constraint(constraint_response_format(constraint), LIMITS) == constraint
    for bad, message in [
        ({"type": "yaml"}, "'yaml' is not supported"),
        ({"type": "json_schema"}, "needs a `schema`"),
        ("json", "must be an object"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            response_format_constraint(bad, LIMITS)
