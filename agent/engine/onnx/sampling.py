"""Per-request token choice for the ONNX engine (pure numpy/Python: unit-testable without a model).

The engine chooses tokens itself rather than with onnxruntime-genai's sampler because the sampler's options
(temperature, top-p, seed, min length) are per generator, i.e. per batch: choosing per row lets requests with
different sampling settings share one forward batch, and gives each seeded request its own random stream: that
random stream is not consumed by the requests it is batched with (its logits can still differ in the last bits with
the batch shape: ONNX Runtime's int4 kernels are not batch-invariant).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.engine.types import SamplingParams

_TOP_P_CANDIDATES = 1024  # nucleus search starts with the top-k logits; falls back to a full sort when too flat


def choose_token(
    logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator, banned: Sequence[int] = ()
) -> int:
    """One token from a row of logits: argmax when greedy, else temperature + top-p sampling. `banned` ids (EOS
    while a minimum length is not reached) are never chosen."""
    if banned:
        logits = logits.copy()
        logits[list(banned)] = -np.inf
    if sampling.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        ids = _nucleus(probs, sampling.top_p)
        kept = probs[ids] / probs[ids].sum()
        return int(ids[rng.choice(len(ids), p=kept)])
    return int(rng.choice(len(probs), p=probs))


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Smallest set of most likely ids whose probabilities sum to at least top_p."""
    k = min(_TOP_P_CANDIDATES, len(probs))
    top = np.argpartition(probs, -k)[-k:]
    if probs[top].sum() < top_p:  # a flat distribution: the candidates are not enough
        top = np.arange(len(probs))
    order = top[np.argsort(probs[top])[::-1]]
    cut = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    return order[:cut]
