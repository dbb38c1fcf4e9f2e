"""Checking a JSON Schema before it is compiled: size, nesting, enum and keyword limits, one rule set for both doors.

A schema that breaks a limit, or uses a keyword the grammar engine would silently ignore (so the answer would not be
constrained as the client asked), is refused with `InvalidRequestError` (400) naming the keyword and where it is.
The keywords below are the ones both grammar engines enforce (llguidance 1.7 for the transformers and ONNX engines,
xgrammar 0.2.8 in vLLM and OpenVINO; read from their sources and tried here); the annotations are keywords JSON Schema
itself defines as having no effect on validation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from agent.engine.errors import InvalidRequestError
from agent.engine.types import OutputConstraint

# Keywords that shape the answer and that the grammar engines enforce.
ENFORCED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "format",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
# Keywords without effect on what is valid (JSON Schema's annotations), and pydantic's/OpenAPI's extras.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",  # pydantic's tagged unions: the oneOf/anyOf beside it carries the structure
        "nullable",
    }
)
# Keywords whose values are maps of names to subschemas, or lists of subschemas.
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# Regex features xgrammar ignores with a warning and llguidance refuses: one clear 400 for every engine.
_UNSUPPORTED_REGEX = re.compile(r"\(\?<?[=!]|\\[1-9]|\\k<")


@dataclass(frozen=True)
class SchemaLimits:
    """Limits on a request's JSON Schema (MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_ENUM)."""

    max_bytes: int = 64 * 1024
    max_depth: int = 32
    max_enum: int = 1000


def canonical_json(value: Any) -> str:
    """One compact text per schema (the cache key). Keys keep their order: properties are generated in it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def check_schema(schema: Any, limits: SchemaLimits, *, field: str = "response_format.json_schema.schema") -> str:
    """Validate a JSON Schema against the limits and the supported keywords; return its canonical text.

    Raises InvalidRequestError (400) naming `field` and the offending place (a JSON pointer).
    """
    if isinstance(schema, bool):
        raise InvalidRequestError(f"{field}: a boolean schema is not supported; send an object schema")
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{field}: must be a JSON object (a JSON Schema)")
    try:
        text = canonical_json(schema)
    except (ValueError, RecursionError):
        raise InvalidRequestError(f"{field}: nested deeper than MAX_SCHEMA_DEPTH={limits.max_depth}") from None
    if len(text.encode("utf-8")) > limits.max_bytes:
        raise InvalidRequestError(f"{field}: larger than MAX_SCHEMA_BYTES={limits.max_bytes} bytes")
    _walk(schema, "#", 1, limits, field)
    return text


def _walk(node: Any, where: str, depth: int, limits: SchemaLimits, field: str) -> None:
    if depth > limits.max_depth:
        raise InvalidRequestError(f"{field}: nested deeper than MAX_SCHEMA_DEPTH={limits.max_depth} (at {where})")
    if isinstance(node, bool):
        return  # `true` / `false` subschemas (e.g. additionalProperties: false)
    if not isinstance(node, dict):
        raise InvalidRequestError(f"{field}: {where} must be a schema object")
    for key, value in node.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise InvalidRequestError(f"{field}: unsupported JSON Schema keyword {key!r} at {where}")
        at = f"{where}/{key}"
        if key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise InvalidRequestError(f"{field}: {at} must be an object of schemas")
            for name, sub in value.items():
                _walk(sub, f"{at}/{name}", depth + 1, limits, field)
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise InvalidRequestError(f"{field}: {at} must be a non-empty list of schemas")
            if key == "allOf" and len(value) > 1:
                raise InvalidRequestError(f"{field}: allOf with more than one schema is not supported (at {at})")
            for i, sub in enumerate(value):
                _walk(sub, f"{at}/{i}", depth + 1, limits, field)
        elif key in ("items", "additionalProperties") and not isinstance(value, bool):
            _walk(value, at, depth + 1, limits, field)
        elif key == "enum":
            if not isinstance(value, list) or not value:
                raise InvalidRequestError(f"{field}: {at} must be a non-empty list")
            if len(value) > limits.max_enum:
                raise InvalidRequestError(f"{field}: {at} has more than MAX_SCHEMA_ENUM={limits.max_enum} values")
        elif key == "pattern":
            _check_pattern(value, at, field)


def _check_pattern(pattern: Any, where: str, field: str) -> None:
    if not isinstance(pattern, str):
        raise InvalidRequestError(f"{field}: {where} must be a string")
    if _UNSUPPORTED_REGEX.search(pattern):
        raise InvalidRequestError(f"{field}: {where}: lookaround and backreferences are not supported in patterns")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidRequestError(f"{field}: {where}: invalid regular expression ({exc})") from None


def json_schema_constraint(schema: Any, limits: SchemaLimits, *, field: str) -> OutputConstraint:
    """A checked `json_schema` constraint."""
    return OutputConstraint(kind="json_schema", schema=check_schema(schema, limits, field=field))


def response_format_constraint(response_format: Any, limits: SchemaLimits) -> OutputConstraint | None:
    """OpenAI's `response_format` (a dict) -> the engine's constraint; None for `{"type": "text"}` or absent.

    Shapes: `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidRequestError("response_format: must be an object with a `type`")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(kind="json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidRequestError("response_format.json_schema: needs a `schema` (and a `name`)")
        return json_schema_constraint(spec["schema"], limits, field="response_format.json_schema.schema")
    raise InvalidRequestError(
        f"response_format.type: {kind!r} is not supported (use 'text', 'json_object' or 'json_schema')"
    )


def constraint_response_format(constraint: OutputConstraint) -> dict[str, Any]:
    """The inverse of `response_format_constraint` (the gateway sends constraints to Triton in OpenAI's shape)."""
    if constraint.kind == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": json.loads(constraint.schema)}}
