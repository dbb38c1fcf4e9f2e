"""The llguidance layer (agent.engine.structured.grammar) on SmolLM2's real tokenizer: compile cache, timeouts, errors,
and the per-row bitmask on torch and numpy logits."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.engine.errors import InvalidRequestError
from agent.engine.structured.grammar import GrammarCache, GrammarLimits, GrammarState, apply_masks
from agent.engine.types import OutputConstraint

VOCAB = 49152  # SmolLM2's logits width
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(smollm_folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_folder)


def cache_for(tokenizer, **limits: float) -> GrammarCache:
    return GrammarCache(tokenizer, VOCAB, [EOS], GrammarLimits(**limits))  # type: ignore[arg-type]


def schema(name: str) -> OutputConstraint:
    body = {"type": "object", "properties": {name: {"type": "integer"}}, "required": [name]}
    return OutputConstraint("json_schema", json.dumps(body))


async def test_compiled_once_then_cached_lru(tokenizer) -> None:
    cache = cache_for(tokenizer, cache_size=2)
    a, b, c = schema("a"), schema("b"), schema("c")
    first = await cache.get(a)
    assert await cache.get(a) is first and cache.compiles == 1
    await cache.get(b)
    await cache.get(c)  # evicts a (least recently used)
    assert cache.cached(a) is None and cache.cached(c) is not None
    await cache.get(a)
    assert cache.compiles == 4
    cache.close()


async def test_concurrent_requests_share_one_compile(tokenizer) -> None:
    cache = cache_for(tokenizer)
    results = await asyncio.gather(*[cache.get(schema("same")) for _ in range(8)])
    assert cache.compiles == 1 and all(r is results[0] for r in results)
    cache.close()


async def test_uncompilable_schema_is_a_400(tokenizer) -> None:
    cache = cache_for(tokenizer)
    with pytest.raises(InvalidRequestError, match="cannot be compiled") as err:
        await cache.get(OutputConstraint("json_schema", '{"$ref": "#/$defs/missing"}'))
    assert err.value.status == 400 and "missing" in err.value.message and ".cc" not in err.value.message
    cache.close()


async def test_slow_compile_times_out_and_is_remembered(tokenizer) -> None:
    cache = cache_for(tokenizer, compile_timeout_s=0.01)
    # ~0.15 s to compile here, 15x the timeout (llguidance builds a big enum's lexer quickly: it takes this many)
    slow = OutputConstraint("json_schema", json.dumps({"enum": [f"value-number-{i}" for i in range(40_000)]}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(InvalidRequestError, match="GRAMMAR_COMPILE_TIMEOUT_S=0.01"):
        await cache.get(slow)
    assert loop.time() - started < 1.5
    started = loop.time()
    with pytest.raises(InvalidRequestError, match="GRAMMAR_COMPILE_TIMEOUT_S"):
        await cache.get(slow)
    assert loop.time() - started < 0.1  # refused at once the second time
    assert await cache.get(schema("fine"))  # the other compile thread still serves
    cache.close()


def _allowed(row: torch.Tensor | np.ndarray) -> set[int]:
    values = torch.as_tensor(row)
    return set(torch.nonzero(torch.isfinite(values)).flatten().tolist())


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_masks_touch_only_constrained_rows(tokenizer, kind: str) -> None:
    cache = cache_for(tokenizer)
    compiled = cache.get_blocking(schema("n"))
    state = GrammarState(compiled)
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((3, VOCAB)).astype(np.float32)
    logits = torch.from_numpy(raw.copy()) if kind == "torch" else raw.copy()
    apply_masks(logits, [None, state, None])
    out = np.asarray(logits)
    assert np.array_equal(out[0], raw[0]) and np.array_equal(out[2], raw[2])  # free rows: bit for bit
    allowed = _allowed(out[1])
    assert allowed and len(allowed) < 100  # a JSON object starts with `{` (and few tokens begin with it)
    assert all(tokenizer.decode([t]).startswith("{") for t in allowed)
    cache.close()


def test_state_follows_the_grammar_to_its_end(tokenizer) -> None:
    cache = cache_for(tokenizer)
    state = GrammarState(cache.get_blocking(schema("n")))
    for token in tokenizer.encode('{"n":42}', add_special_tokens=False):
        assert state.accept(token)
    logits = torch.zeros(1, VOCAB)
    apply_masks(logits, [state])
    assert _allowed(logits[0]) == {EOS}  # complete: only the end token
    assert not state.terminated and state.accept(EOS) and state.terminated
    bad = GrammarState(cache.get_blocking(schema("n")))
    assert not bad.accept(tokenizer.encode("hello", add_special_tokens=False)[0])
    cache.close()


def test_apply_masks_without_constraints_is_a_no_op() -> None:
    logits = np.ones((2, 8), dtype=np.float32)
    apply_masks(logits, [None, None])
    assert np.array_equal(logits, np.ones((2, 8), dtype=np.float32))


def _accepts(tokenizer, compiled, text: str) -> bool:
    state = GrammarState(compiled)
    return all(state.accept(t) for t in tokenizer.encode(text, add_special_tokens=False)) and state.accept(EOS)


def test_strict_schemas_refuse_unlisted_properties_and_items(tokenizer) -> None:
    """`strict: true` as xgrammar's strict mode (and vLLM): no `additionalProperties` means none; json_object is any."""
    cache = cache_for(tokenizer)
    person = {"type": "object", "properties": {"name": {"type": "string"}}}  # as pydantic writes it
    listed = cache.get_blocking(
        OutputConstraint("json_schema", json.dumps({"$defs": {"p": person}, "$ref": "#/$defs/p"}))
    )
    assert _accepts(tokenizer, listed, '{"name":"Ann"}') and not _accepts(tokenizer, listed, '{"name":"Ann","age":3}')
    open_ = cache.get_blocking(OutputConstraint("json_schema", json.dumps({**person, "additionalProperties": True})))
    assert _accepts(tokenizer, open_, '{"name":"Ann","age":3}')
    pair = cache.get_blocking(OutputConstraint("json_schema", '{"type":"array","prefixItems":[{"type":"integer"}]}'))
    assert _accepts(tokenizer, pair, "[1]") and not _accepts(tokenizer, pair, "[1,2]")
    anything = cache.get_blocking(OutputConstraint("json_object"))
    assert _accepts(tokenizer, anything, '{"a":{"b":[1,null]}}')
    cache.close()
