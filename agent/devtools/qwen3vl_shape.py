"""A random Qwen3-VL with Qwen3-VL-2B-Instruct's real shapes where they set the cost, for CPU benchmarks, offline.

Vision tower exactly as Qwen3-VL-2B (24 blocks, hidden 1024, MLP 4096, 16 heads, 16-px patches, 2x2 merge into the
2048-wide LLM, 2304 position embeddings, DeepStack taps at blocks 5, 11, 17) and its decoder's width (hidden 2048,
MLP 6144, 16 query / 8 KV heads of 128, tied 151936-row embeddings, so the LM head costs what the real one does),
but only `layers` decoder layers (default 2 of 28) to keep it buildable and exportable on a laptop: ~0.8 B
parameters, 3.2 GB in fp32. Tokenizer, chat template and image processor are the tiny model's
(agent.devtools.tiny_qwen3vl), so it runs offline; its text is gibberish (random weights), its timings are what
matter. Image cost per 512x512 image: 1024 patches through 24 vision blocks, 256 LLM tokens.

Usage: `python -m agent.devtools.qwen3vl_shape OUT_DIR [--layers N]`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# Qwen3-VL-2B-Instruct's vision tower and decoder widths (its config.json).
VISION = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "out_hidden_size": 2048,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
    "hidden_act": "gelu_pytorch_tanh",
}
TEXT = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20]},
}


def shape_config(tokenizer, layers: int = 2):
    """The Qwen3VLConfig: Qwen3-VL-2B's vision tower and decoder widths, `layers` decoder layers, `tokenizer`'s ids."""
    from agent.devtools.tiny_qwen3vl import qwen3vl_config

    return qwen3vl_config(tokenizer, {**TEXT, "num_hidden_layers": layers}, VISION, tie_word_embeddings=True)


def build_qwen3vl_shape(out: Path, layers: int = 2) -> Path:
    """Build the model into `out` once (atomically) and return `out`; returns at once if it exists."""
    from agent.devtools.tiny_qwen3vl import build_once, save_random_qwen3vl

    built = (Path(out) / "config.json").exists()
    out = build_once(
        out,
        lambda folder: save_random_qwen3vl(folder, lambda tok: shape_config(tok, layers), max_pixels=1024 * 1024),
    )
    if not built:
        log.info("built the Qwen3-VL-2B-shaped model (%d decoder layers) in %s", layers, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a random Qwen3-VL with Qwen3-VL-2B's shapes (benchmarks).")
    parser.add_argument("out", type=Path, help="output folder (left as it is if it already holds a model)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Qwen3-VL-2B has 28)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_qwen3vl_shape(args.out, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
