"""Faithfulness of the OpenVINO engine to transformers (fp32): exact greedy tokens for fp32 exports, perplexity
ratios for the int8 and int4 exports of SmolLM2-135M (figures in docs/openvino.md).

- fp32 (QUANTIZATION_TYPE=none, DTYPE=float32): the engine's greedy answers equal the transformers engine's, on
  SmolLM2 and on the tiny Qwen3-VL with and without an image;
- int8 / int4: perplexity on tests/data/perplexity.txt, teacher-forced through the exported IR in OpenVINO (f32
  compute, so only the weights differ) against transformers fp32, as tests/engine/test_faithfulness.py does for ONNX.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.config import Quantization
from agent.engine.openvino.build import ensure_openvino_model, export_options, read_config
from agent.engine.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from tests.engine.test_faithfulness import PROMPTS, _nll_per_token

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

TEXT = Path(__file__).parent.parent.parent / "data" / "perplexity.txt"
NEW_TOKENS = 32
# Measured on SmolLM2-135M (docs/openvino.md), bounded with margin for exporter/runtime changes.
PPL_BOUNDS = {Quantization.int8: 1.05, Quantization.int4: 1.45}


def _greedy(*parts: object, tokens: int = NEW_TOKENS) -> GenerationRequest:
    content = tuple(ImagePart(p) if isinstance(p, Image.Image) else TextPart(str(p)) for p in parts)
    sampling = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    return GenerationRequest(messages=(Message("user", content),), sampling=sampling)


async def test_fp32_greedy_equals_transformers_on_smollm(openvino_smollm_engine, smollm_engine) -> None:
    requests = [_greedy(p) for p in PROMPTS[:4]]
    ours = await asyncio.gather(*(openvino_smollm_engine.complete(r) for r in requests))
    reference = await asyncio.gather(*(smollm_engine.complete(r) for r in requests))
    assert [(r.text, r.completion_tokens) for r in ours] == [(r.text, r.completion_tokens) for r in reference]


async def test_fp32_greedy_equals_transformers_on_tiny_qwen3vl(openvino_tiny_vl_engine, tiny_vl_engine) -> None:
    image = Image.new("RGB", (128, 96), (220, 40, 40))
    image.paste((20, 20, 200), (32, 32, 96, 80))
    requests = [_greedy("What is a binary tree?"), _greedy(image, "Describe this image.")]
    for request in requests:
        ours = await openvino_tiny_vl_engine.complete(request)
        reference = await tiny_vl_engine.complete(request)
        assert (ours.text, ours.prompt_tokens, ours.completion_tokens) == (
            reference.text,
            reference.prompt_tokens,
            reference.completion_tokens,
        )


def _openvino_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """Logits at every position of `ids` in one forward pass of the exported (stateful) IR, f32 compute."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        model_dir / "openvino_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    )
    batch = np.asarray([ids], dtype=np.int64)
    inputs = {
        "input_ids": batch,
        "attention_mask": np.ones_like(batch),
        "position_ids": np.arange(len(ids), dtype=np.int64)[None],
        "beam_idx": np.zeros(1, dtype=np.int32),
    }
    return compiled.create_infer_request().infer(inputs)["logits"][0]


@pytest.fixture(scope="module")
async def reference_perplexity(smollm_folder: Path) -> tuple[list[int], float]:
    from transformers import AutoTokenizer

    from tests.engine.test_faithfulness import _transformers_logits

    ids = AutoTokenizer.from_pretrained(smollm_folder)(TEXT.read_text())["input_ids"]
    reference = float(np.exp(_nll_per_token(await asyncio.to_thread(_transformers_logits, smollm_folder, ids), ids)))
    assert 5.0 < reference < 30.0, "the reference model itself is off: check the test text and the model"
    return ids, reference


@pytest.mark.parametrize("quantization", [Quantization.int8, Quantization.int4])  # fp32: exact, above
async def test_perplexity_within_bound(
    quantization: Quantization, reference_perplexity, smollm_folder: Path, model_cache_dir: Path, record_property
) -> None:
    ids, reference = reference_perplexity
    options = export_options(quantization, read_config(smollm_folder))
    model_dir = await asyncio.to_thread(ensure_openvino_model, smollm_folder, model_cache_dir, options, kind="text")
    perplexity = float(np.exp(_nll_per_token(await asyncio.to_thread(_openvino_logits, model_dir, ids), ids)))
    ratio = perplexity / reference
    record_property(f"perplexity_openvino_{options.tag}", round(perplexity, 3))
    log.warning("perplexity on %d tokens: transformers fp32 %.3f, openvino %s %.3f (x%.4f)", len(ids), reference,
                options.tag, perplexity, ratio)  # fmt: skip
    assert ratio <= PPL_BOUNDS[quantization]
