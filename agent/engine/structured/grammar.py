"""Constrained decoding for the engines we drive ourselves (transformers, ONNX), on llguidance.

Why llguidance (1.7, installed with vLLM, which offers it as its `guidance` backend): its token masks come from a
lexer over the token trie, so a row's mask takes tens of microseconds in most states and well under a millisecond
inside a bounded string (`maxLength`), where xgrammar 0.2.8 (tried first) scans the whole 49k vocabulary (~9 ms a
row, +45 % inter-token latency at 32 rows on ONNX). Its batched fill runs every row on native threads without the
GIL, so the ONNX scheduler computes a step's masks while onnxruntime runs that step's forward pass.

- `GrammarCache` (one per loaded model): compiles a constraint once (JSON Schema -> llguidance grammar -> a matcher
  template) on a small thread pool, never on the event loop or a scheduler thread, with the LRU, the shared
  compiles and the GRAMMAR_COMPILE_TIMEOUT_S refusal of agent.engine.structured.compile_cache; a schema llguidance
  cannot compile is a 400 naming its reason.
- `GrammarState` (one per constrained request): a copy of the template matcher, advanced with each accepted token.
- `fill_masks` / `apply_row_masks` (`apply_masks` is both): in a scheduler's batched step, the constrained rows'
  bitmasks are filled in one call and applied to the logits in place with one vectorized op (numpy or torch), so
  constrained and free rows share one batch.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agent.engine.errors import InvalidRequestError
from agent.engine.structured.compile_cache import CompileCache, GrammarLimits
from agent.engine.types import OutputConstraint

log = logging.getLogger(__name__)

_COMPILE_THREADS = 2  # compiles run beside generation: at most this many cores go to them
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # what `json_object` means (as in vLLM)
# Compact JSON (no free whitespace: a small model cannot loop on spaces or newlines), as vLLM's structured outputs
# with disable_any_whitespace; oneOf is read as anyOf (as xgrammar and vLLM do: exclusivity cannot be masked).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "coerce_one_of": True}


@dataclass(frozen=True)
class Compiled:
    """A compiled constraint: a matcher at the grammar's start, copied for each request."""

    template: Any  # llguidance.LLMatcher, never advanced
    stop_token_ids: frozenset[int]
    vocab_size: int
    schema: str  # the JSON Schema it was compiled from


class GrammarCache(CompileCache[Compiled]):
    """Compiles constraints for one tokenizer/vocabulary into llguidance matcher templates (agent.engine.structured.
    compile_cache: off the caller's thread, LRU, compile time limit)."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], limits: GrammarLimits | None = None
    ) -> None:
        import llguidance.hf

        super().__init__(limits, _COMPILE_THREADS, "grammar-compile")
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=self.stop_token_ids)

    def _build(self, constraint: OutputConstraint) -> Compiled:
        import llguidance

        schema = JSON_OBJECT_SCHEMA if constraint.kind == "json_object" else constraint.schema
        try:
            if constraint.kind != "json_object":
                schema = json.dumps(strict_schema(json.loads(schema)))
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidRequestError(f"response_format: the schema cannot be compiled: {_short(str(exc))}") from None
        # The matcher is built here (its parser and lexer; what takes time for a big schema), so a request only
        # copies it. llguidance never raises on a bad grammar: the matcher is left in an error state instead.
        template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if template.is_error():
            raise InvalidRequestError(f"response_format: the schema cannot be compiled: {_short(template.get_error())}")
        return Compiled(template, frozenset(self.stop_token_ids), self.vocab_size, schema)

    async def state(self, constraint: OutputConstraint | None) -> GrammarState | None:
        """A fresh per-request matcher for `constraint` (None when unconstrained)."""
        if constraint is None:
            return None
        return GrammarState(await self.get(constraint))


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")


def strict_schema(node: Any) -> Any:
    """`strict: true` as xgrammar's strict mode reads it (vLLM's default backend; docs/api.md): an object schema with
    `properties` allows no other property unless its `additionalProperties` says so, and `prefixItems` without
    `items` no other item. (llguidance follows JSON Schema, where both default to allowed.) Only subschemas are
    walked: an `enum`, `const` or `default` value is data, never rewritten."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(sub) for sub in out[key]]
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = strict_schema(out[key])
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if "prefixItems" in out and "items" not in out:
        out["items"] = False
    return out


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())  # llguidance's regex errors span lines
    return text[:limit]


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, compiled: Compiled) -> None:
        self.vocab_size = compiled.vocab_size
        self._stops = compiled.stop_token_ids
        self._matcher = compiled.template.deep_copy()
        self._ended = False

    @property
    def matcher(self) -> Any:
        """llguidance's LLMatcher (`fill_masks` fills many rows' masks at once from them)."""
        return self._matcher

    def accept(self, token: int) -> bool:
        """Advance with the token the row produced; False if the grammar did not allow it."""
        if not self._matcher.consume_token(token):
            return False
        self._ended = token in self._stops
        return True

    def allows(self, token: int) -> bool:
        """Whether the grammar allows `token` next (one token's check: far cheaper than filling a whole mask)."""
        return self._matcher.validate_tokens([token]) == 1

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its end token was accepted: nothing more may be generated."""
        return self._ended


@functools.cache
def _executor() -> Any:
    import llguidance

    from agent.engine.cpu import usable_cores

    return llguidance.LLExecutor(usable_cores())


@dataclass(frozen=True)
class RowMasks:
    """The filled bitmasks of a batch's constrained rows: `bits[k]` (packed, 32 tokens per int32) is row `rows[k]`'s."""

    rows: list[int]
    bits: np.ndarray  # [len(rows), ceil(vocab / 32)] int32
    vocab_size: int


def fill_masks(states: Sequence[GrammarState | None]) -> RowMasks | None:
    """Fill the bitmasks of the constrained rows (None when there are none), every row in one native call that
    runs on llguidance's threads without the GIL (so it can overlap a forward pass run on another thread)."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return None
    import llguidance.numpy as lnp

    vocab = states[rows[0]].vocab_size  # type: ignore[union-attr]
    bits = lnp.allocate_token_bitmask(len(rows), vocab)
    lnp.fill_next_token_bitmask_par(_executor(), [(states[i].matcher, k) for k, i in enumerate(rows)], bits)  # type: ignore[union-attr]
    return RowMasks(rows, bits, vocab)


def apply_row_masks(logits: torch.Tensor | np.ndarray, masks: RowMasks | None) -> None:
    """Set the logits of the tokens the masks forbid to -inf, in place ([B, V] float32; numpy, or torch on any
    device). Rows without a mask are left untouched (bit for bit); ids at or beyond the tokenizer's vocabulary (a
    model's padding) are never allowed in a masked row."""
    if masks is None:
        return
    rows, vocab = masks.rows, masks.vocab_size
    width = min(vocab, logits.shape[-1])
    # One unpack of the whole packed batch (little-endian: token 32*w + b is bit b of word w), not a loop over rows.
    allowed = np.unpackbits(masks.bits.view(np.uint8), axis=1, count=width, bitorder="little").view(bool)
    if isinstance(logits, np.ndarray):
        for k, i in enumerate(rows):  # copyto edits the row in place; fancy indexing would copy
            np.copyto(logits[i, :width], -np.inf, where=~allowed[k])
        logits[rows, width:] = -np.inf
        return
    index = torch.tensor(rows, device=logits.device)
    forbidden = torch.from_numpy(~allowed).to(logits.device)
    logits[index, :width] = logits[index, :width].masked_fill(forbidden, float("-inf"))
    logits[index, width:] = float("-inf")


def apply_masks(logits: torch.Tensor | np.ndarray, states: Sequence[GrammarState | None]) -> None:
    """Set the logits of tokens each constrained row's grammar forbids to -inf, in place ([B, V] float32).

    Rows whose state is None are left untouched (bit for bit), so free rows in a batch with constrained ones give the
    tokens they would alone.
    """
    apply_row_masks(logits, fill_masks(states))


class LazyGrammarCache:
    """An engine's `GrammarCache`, built on the first constrained request (reading the vocabulary takes ~1 s, which
    unconstrained deployments never pay)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], limits: GrammarLimits) -> None:
        self._args = (tokenizer, vocab_size, frozenset(stop_token_ids), limits)
        self._lock = threading.Lock()
        self._cache: GrammarCache | None = None

    def cache(self) -> GrammarCache:
        """The cache, built now if needed (blocking: call off the event loop)."""
        with self._lock:
            if self._cache is None:
                tokenizer, vocab, stops, limits = self._args
                self._cache = GrammarCache(tokenizer, vocab, stops, limits)
            return self._cache

    async def state(self, constraint: OutputConstraint | None) -> GrammarState | None:
        """A fresh matcher for a request's constraint (None when unconstrained)."""
        if constraint is None:
            return None
        cache = self._cache or await asyncio.to_thread(self.cache)
        return await cache.state(constraint)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
