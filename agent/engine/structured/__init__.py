"""Structured output and tool calling for every engine (docs/api.md "Structured output and tool calling").

- `schema`: JSON Schema limits and keyword checks, OpenAI `response_format` -> `OutputConstraint` (both doors);
- `grammar`: constrained decoding on llguidance for the transformers and ONNX schedulers (vLLM uses its own);
- `tools`: tools in the prompt, forced-call constraints, tool calls read back from the answer.
"""

from agent.engine.structured.schema import SchemaLimits, check_schema, response_format_constraint

__all__ = ["SchemaLimits", "check_schema", "response_format_constraint"]
