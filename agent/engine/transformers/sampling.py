"""Per-request token sampling over a batch of logits: greedy rows by argmax, the others by temperature + top-p with
each request's own seeded `torch.Generator` (same seed -> same tokens, whatever else shares the batch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from agent.engine.types import SamplingParams

# Nucleus sampling looks at the top-k probabilities first (cheap) and sorts the whole vocabulary only for the rare
# row whose top-k mass is below top_p, so the result is exact.
_TOP_K_FAST = 256


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded by the request's seed, or randomly when it has none."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _nucleus_sample(probs: torch.Tensor, top_p: float, gen: torch.Generator) -> int:
    k = min(_TOP_K_FAST, probs.shape[-1])
    vals, idx = probs.topk(k)
    if top_p < 1.0 and float(vals.sum()) < top_p and k < probs.shape[-1]:
        vals, idx = probs.sort(descending=True)
    elif top_p >= 1.0:
        vals, idx = probs, torch.arange(probs.shape[-1])
    if top_p < 1.0:
        cum = vals.cumsum(-1)
        vals = vals.masked_fill(cum - vals > top_p, 0.0)  # keep the smallest prefix whose mass reaches top_p
    choice = torch.multinomial(vals, 1, generator=gen)
    return int(idx[choice])


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row of `logits` [B, V] (float32, on CPU)."""
    tokens = logits.argmax(dim=-1)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        tokens[row] = _nucleus_sample(probs, p.top_p, gen)
    return tokens
