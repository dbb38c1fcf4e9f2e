"""Faithfulness of the quantized ONNX engine (int4) to the transformers engine on SmolLM2-135M.

Two measures, both reported in docs/onnx.md:
- greedy token agreement on a fixed prompt set: the share of the reference's tokens produced before the int4
  output first diverges (once greedy decoding diverges, everything after differs, so the prefix is what counts);
- perplexity on tests/data/perplexity.txt, teacher-forced: the transformers model in fp32 (its bf16 perplexity is the
  same to 0.1 %) against the int4 and int8 models the engine serves, run token by token through onnxruntime-genai.

Bounds come from measurement (docs/onnx.md) with margin: int4 perplexity was 1.31x the fp32 reference, bounded at
1.45x; int8 (QUANTIZATION_TYPE=int8) measured 1.01x, bounded at 1.05x. Greedy agreement is low for int4 on a
135M model (see the constants below).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from agent.config import Quantization
from agent.engine.onnx.build import OnnxBuildOptions, ensure_onnx_model
from agent.engine.spec import EngineSpec
from agent.engine.types import GenerationRequest, Message, SamplingParams

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

TEXT = Path(__file__).parent.parent / "data" / "perplexity.txt"
PROMPTS = (
    "What is a binary tree?",
    "Explain what a hash table is.",
    "What is the difference between a stack and a queue?",
    "Describe how binary search works.",
    "What is recursion in programming?",
    "Why is quicksort fast on average?",
    "What is a linked list?",
    "Give one use of a graph data structure.",
)
NEW_TOKENS = 32
PPL_RATIO_BOUND = 1.45  # measured 1.31 (int4 14.59 vs fp32 11.09); margin for builder/runtime changes
INT8_PPL_RATIO_BOUND = 1.05  # measured 1.01 (int8, blocks of 128: 11.20)
# Greedy agreement is reported, with only a sanity floor: int4 diverges early on this 135M model (measured mean
# prefix agreement 0.10 and the same first token on 5 of 8 prompts, see docs/onnx.md).
AGREEMENT_BOUND = 0.04
FIRST_TOKEN_BOUND = 3


@pytest.fixture(scope="module")
async def int4_engine(smollm_folder: Path, model_cache_dir: Path):
    from agent.engine.onnx.engine import OnnxEngine

    spec = EngineSpec(
        folder=smollm_folder, name="SmolLM2-135M-Instruct", quantization=Quantization.int4, cache_dir=model_cache_dir
    )
    engine = OnnxEngine(spec)
    await engine.start()
    yield engine
    await engine.shutdown()


def _greedy(prompt: str) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message.text("user", prompt),), sampling=SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def test_greedy_token_agreement(int4_engine, smollm_engine, smollm_folder: Path, record_property) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_folder)
    references = await asyncio.gather(*(smollm_engine.complete(_greedy(p)) for p in PROMPTS))
    outputs = await asyncio.gather(*(int4_engine.complete(_greedy(p)) for p in PROMPTS))
    shares, first_token_same = [], 0
    for ref, out in zip(references, outputs, strict=True):
        ref_ids = tokenizer(ref.text, add_special_tokens=False)["input_ids"]
        out_ids = tokenizer(out.text, add_special_tokens=False)["input_ids"]
        shares.append(_common_prefix(ref_ids, out_ids) / max(len(ref_ids), 1))
        first_token_same += bool(ref_ids and out_ids and ref_ids[0] == out_ids[0])
        assert out.text.strip(), "int4 produced an empty answer"
    agreement = float(np.mean(shares))
    record_property("greedy_prefix_agreement", round(agreement, 3))
    record_property("first_token_agreement", f"{first_token_same}/{len(PROMPTS)}")
    log.warning(
        "int4 vs transformers greedy: prefix agreement %.3f, first token %d/%d, per prompt %s",
        agreement,
        first_token_same,
        len(PROMPTS),
        [round(s, 2) for s in shares],
    )
    assert agreement >= AGREEMENT_BOUND and first_token_same >= FIRST_TOKEN_BOUND


def _nll_per_token(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] given the logits at positions [:-1] (float64 log-softmax)."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    log_probs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


def _onnx_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits for every position, through onnxruntime-genai as the engine runs the model: one token
    appended at a time (the engine's models compute the LM head for the last token only, see onnx_last_token)."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    logits = []
    for token in ids:
        generator.append_tokens(np.asarray([[token]], dtype=np.int32))
        logits.append(generator.get_logits()[0, -1].copy())
    return np.stack(logits)


def _transformers_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
async def reference_perplexity(smollm_folder: Path) -> tuple[list[int], float]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm_folder)(TEXT.read_text())["input_ids"]
    assert len(ids) > 400
    reference = float(np.exp(_nll_per_token(await asyncio.to_thread(_transformers_logits, smollm_folder, ids), ids)))
    assert 5.0 < reference < 30.0, "the reference model itself is off: check the test text and the model"
    return ids, reference


@pytest.mark.parametrize(("precision", "bound"), [("int4", PPL_RATIO_BOUND), ("int8", INT8_PPL_RATIO_BOUND)])
async def test_perplexity_within_bound(
    precision: str, bound: float, reference_perplexity, smollm_folder: Path, model_cache_dir: Path, record_property
) -> None:
    ids, reference = reference_perplexity
    model_dir = await asyncio.to_thread(ensure_onnx_model, smollm_folder, model_cache_dir, OnnxBuildOptions(precision))
    quantized = float(np.exp(_nll_per_token(await asyncio.to_thread(_onnx_logits, model_dir, ids), ids)))
    ratio = quantized / reference
    record_property("perplexity_fp32", round(reference, 3))
    record_property(f"perplexity_{precision}", round(quantized, 3))
    log.warning(
        "perplexity on %d tokens: transformers fp32 %.3f, onnx %s %.3f (x%.3f)",
        len(ids),
        reference,
        precision,
        quantized,
        ratio,
    )
    assert ratio <= bound
