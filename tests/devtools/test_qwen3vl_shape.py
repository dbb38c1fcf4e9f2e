"""The Qwen3-VL-2B-shaped benchmark model: its config has 2B's vision tower and decoder widths and is buildable
(instantiated on the meta device: no memory, no weights)."""

from __future__ import annotations

import pytest

from agent.devtools.qwen3vl_shape import TEXT, VISION, shape_config
from agent.devtools.tiny_qwen3vl import _train_tokenizer


@pytest.mark.slow  # builds the model (on the meta device)
def test_shape_config_has_qwen3_vl_2b_dims_and_builds() -> None:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    config = shape_config(_train_tokenizer(), layers=2)
    vision, text = config.vision_config, config.text_config
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (24, 1024, 4096, 16)
    assert vision.out_hidden_size == text.hidden_size == TEXT["hidden_size"] == 2048
    assert list(vision.deepstack_visual_indexes) == VISION["deepstack_visual_indexes"]
    assert (text.num_hidden_layers, text.vocab_size, text.head_dim) == (2, 151936, 128)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert 0.7e9 < params < 0.9e9, params  # vision ~0.4 B, tied 151936x2048 embeddings 0.31 B, 2 layers 0.1 B
