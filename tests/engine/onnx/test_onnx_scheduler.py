"""The ONNX scheduler's token choice with grammar masks: masks filled on the worker thread (during the forward pass)
choose what masks filled inline do, and free rows beside constrained ones keep their tokens."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import numpy as np
import pytest

from agent.engine.onnx.scheduler import OnnxSequence, choose_tokens
from agent.engine.structured.grammar import GrammarCache, GrammarState, fill_masks
from agent.engine.types import OutputConstraint, SamplingParams

VOCAB = 49152
EOS = 2


@pytest.fixture(scope="module")
def grammars(smollm_folder: Path):
    from transformers import AutoTokenizer

    cache = GrammarCache(AutoTokenizer.from_pretrained(smollm_folder), VOCAB, [EOS])
    yield cache
    cache.close()


def sequence(grammar: GrammarState | None) -> OnnxSequence:
    return OnnxSequence(
        request_id="r",
        prompt_ids=np.array([1, 2, 3]),
        sampling=SamplingParams(temperature=0.0, max_new_tokens=8),
        max_new_tokens=8,
        sink=lambda chunk: None,
        detokenizer=None,
        eos_ids=frozenset({EOS}),
        grammar=grammar,
    )


def test_masks_from_the_worker_thread_choose_as_inline_masks(grammars: GrammarCache) -> None:
    compiled = grammars.get_blocking(OutputConstraint("json_schema", json.dumps({"type": "integer"})))
    seqs = [sequence(None), sequence(GrammarState(compiled)), sequence(None)]
    raw = np.random.default_rng(1).standard_normal((3, VOCAB)).astype(np.float32)
    free_alone = np.argmax(raw, axis=-1)
    inline = choose_tokens(raw.copy(), seqs)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(fill_masks, [s.grammar for s in seqs])
        ahead = choose_tokens(raw.copy(), seqs, future)
    assert inline == ahead
    assert [inline[0], inline[2]] == [free_alone[0], free_alone[2]]  # free rows: as alone
    assert inline[1] != free_alone[1] and seqs[1].grammar.accept(inline[1])  # the constrained row: in its grammar


def test_a_greedy_row_whose_best_token_is_allowed_needs_no_mask(grammars: GrammarCache, monkeypatch) -> None:
    import agent.engine.onnx.scheduler as scheduler

    compiled = grammars.get_blocking(OutputConstraint("json_schema", json.dumps({"type": "integer"})))
    state = GrammarState(compiled)
    masks = fill_masks([state])
    allowed = np.unpackbits(masks.bits.view(np.uint8), axis=1, count=VOCAB, bitorder="little")[0].astype(bool)
    rng = np.random.default_rng(2)
    for token in rng.choice(VOCAB, 300, replace=False).tolist() + np.flatnonzero(allowed)[:50].tolist():
        assert state.allows(token) == allowed[token], token  # the one-token check agrees with the mask
    raw = rng.standard_normal((1, VOCAB)).astype(np.float32)
    digit = int(np.flatnonzero(allowed)[0])
    raw[0, digit] = 100.0  # the best token is one the grammar allows
    filled: list = []
    monkeypatch.setattr(scheduler, "fill_masks", lambda states: filled.append(states) or fill_masks(states))
    assert choose_tokens(raw.copy(), [sequence(state)]) == [digit]
    assert all(s is None for states in filled for s in states)  # no mask was filled for it
    raw[0, digit] = -100.0  # now forbidden as best: the mask is filled and an allowed token chosen
    (token,) = choose_tokens(raw.copy(), [sequence(state)])
    assert allowed[token] and any(s is not None for states in filled for s in states)
