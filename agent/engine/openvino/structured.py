"""Structured output on OpenVINO: a grammar checked and compiled here, enforced by the pipeline's own xgrammar.

ContinuousBatchingPipeline samples inside `step()` and never exposes the logits, so the shared per-row mask
(agent.engine.structured.grammar, on llguidance) cannot be applied here. The pipeline has its own structured output
(`GenerationConfig.structured_output_config`) on a bundled xgrammar (the only backend OpenVINO GenAI 2026.4 ships),
which masks each constrained row in its sampler; rows with and without a constraint share a step.

What the pipeline is given is an EBNF grammar, not the raw schema: its `json_schema` compiles with xgrammar's
defaults (any whitespace: a small model pretty-prints, or loops on newlines), while every other engine enforces
compact JSON (`{"a":1}`). The grammar is made here with the installed xgrammar (compact separators, no free
whitespace) and compiled once here too, off the event loop and within GRAMMAR_COMPILE_TIMEOUT_S, because the
pipeline compiles it inside `step()` on its scheduler thread, where a schema that fails would fail every request of
the batch and a slow one would stall them all. A schema that does not compile here is a 400; one that compiled is
then compiled again by the pipeline once (xgrammar's compiler cache keeps it).

OpenVINO GenAI 2026.4's bundled xgrammar is older than the installed one (0.2.8): its EBNF parser does not read
the `{m, -1}` (unbounded) repetition 0.2.8 prints; `openvino_ebnf` rewrites it to `*`, `+` or `{m,}` (same language).
Nor does it know the `Regex(...)` macro 0.2.8 writes for a string's `pattern`: such schemas are a 400 here (naming
`pattern`), never sent to the pipeline and never answered unconstrained.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from agent.engine.errors import InvalidRequestError
from agent.engine.structured.compile_cache import CompileCache, GrammarLimits
from agent.engine.structured.grammar import JSON_OBJECT_SCHEMA
from agent.engine.types import OutputConstraint

_UNBOUNDED = re.compile(r"\{(\d+), -1\}")


def openvino_ebnf(ebnf: str) -> str:
    """xgrammar 0.2.8's EBNF text -> the dialect OpenVINO GenAI 2026.4's bundled xgrammar parses."""

    def bound(match: re.Match[str]) -> str:
        low = int(match.group(1))
        return "*" if low == 0 else "+" if low == 1 else f"{{{low},}}"

    converted = _UNBOUNDED.sub(bound, ebnf)
    if "Regex(" in converted:  # 0.2.8 writes a JSON Schema `pattern` as a Regex(...) macro the old parser lacks
        raise InvalidRequestError(
            "response_format: `pattern` is not supported by LOADING_STRATEGY=openvino (OpenVINO GenAI's bundled "
            "xgrammar cannot take it); drop it, or use the transformers, onnx or vllm engine"
        )
    if ", -1}" in converted:  # a form the rewrite does not know: refuse rather than fail the pipeline's batch
        raise InvalidRequestError("response_format: this schema's grammar cannot be expressed for OpenVINO")
    return converted


class OvGrammars(CompileCache[str]):
    """Constraint -> the EBNF text the pipeline enforces; compiled once, off-thread (agent.engine.structured.
    compile_cache: LRU of GRAMMAR_CACHE_SIZE, GRAMMAR_COMPILE_TIMEOUT_S).

    The xgrammar tokenizer info (~1 s to read a vocabulary) is built on the first constrained request."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], limits: GrammarLimits) -> None:
        super().__init__(limits, 1, "openvino-grammar")
        self._args = (tokenizer, vocab_size, sorted(stop_token_ids))
        self._compiler: Any = None

    async def config(self, constraint: OutputConstraint) -> Any:
        """An openvino_genai.StructuredOutputConfig for `constraint`; InvalidRequestError (400) if it cannot be."""
        import openvino_genai as ov_genai

        config = ov_genai.StructuredOutputConfig()
        config.grammar = await self.get(constraint)
        return config

    def _build(self, constraint: OutputConstraint) -> str:
        import xgrammar as xgr

        if self._compiler is None:
            tokenizer, vocab_size, stops = self._args
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        schema = JSON_OBJECT_SCHEMA if constraint.kind == "json_object" else constraint.schema
        try:
            grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
            self._compiler.compile_grammar(grammar)  # what the pipeline will do: its time, its errors
        except Exception as exc:  # xgrammar raises RuntimeError with its parser's message
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            if ".cc:" in reason:  # "[time] /path/file.cc:line: reason"
                reason = reason.split(".cc:", 1)[1].split(": ", 1)[-1]
            raise InvalidRequestError(f"response_format: the schema cannot be compiled: {reason[:300]}") from None
        return openvino_ebnf(str(grammar))
