"""Per-request sampling: greedy rows, seeded generators, top-p."""

from __future__ import annotations

import torch

from agent.engine.transformers.sampling import new_generator, sample_tokens
from agent.engine.types import SamplingParams


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(3, 1000)
    tokens = sample_tokens(logits, [SamplingParams(temperature=0.0)] * 3, [new_generator(0)] * 3)
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_other_rows_do_not_matter() -> None:
    logits = torch.randn(2, 5000)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=5)
    greedy = SamplingParams(temperature=0.0)
    a = [int(sample_tokens(logits[:1], [sampled], [g])[0]) for g in [new_generator(5)] for _ in range(20)]
    gen = new_generator(5)
    b = [int(sample_tokens(logits, [sampled, greedy], [gen, new_generator(None)])[0]) for _ in range(20)]
    assert a == b
    assert len(set(a)) > 1  # it really samples


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.full((1, 300), -20.0)
    logits[0, 7], logits[0, 11] = 5.0, 4.0  # ~73% and ~27% of the mass
    params = [SamplingParams(temperature=1.0, top_p=0.5)]
    gen = new_generator(1)
    assert {int(sample_tokens(logits.clone(), params, [gen])[0]) for _ in range(50)} == {7}
    wide = [SamplingParams(temperature=1.0, top_p=0.99)]
    assert {int(sample_tokens(logits.clone(), wide, [gen])[0]) for _ in range(200)} == {7, 11}
