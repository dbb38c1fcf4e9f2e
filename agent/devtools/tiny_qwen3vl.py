"""A tiny random Qwen3-VL (real architecture, real processor) for tests, built offline in well under a second.

The model is `Qwen3VLForConditionalGeneration` with hidden size 64 and 2 text layers (~0.25 M parameters, ~1 MB), a
byte-level BPE tokenizer trained here (vocab 512) plus Qwen's special tokens, a Qwen-style chat template and
`Qwen2VLImageProcessorPil` (16-px patches, 2x2 merge: one LLM token per 32x32 px). Its weights are random, so its
text is gibberish, but every path a real Qwen3-VL takes (image placeholders, vision tower, M-RoPE) runs for real.

The stock `Qwen3VLProcessor` cannot be built or loaded without torchvision (its video processor); see
`agent.engine.transformers.loading.load_vision_processor`, which
loads this folder (and real Qwen3-VL folders) without it.

Usage: `python -m agent.devtools.tiny_qwen3vl OUT_DIR`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SEED = 1234
VOCAB_SIZE = 512
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style ChatML; an image part becomes <|vision_start|><|image_pad|><|vision_end|> and the processor expands
# the single <|image_pad|> to one token per 32x32 px of the resized image.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small fixed corpus: the BPE merges only need to be deterministic, not good.
_CORPUS = [
    "What is a binary tree? A binary tree is a tree data structure in which each node has at most two children.",
    "Describe this image. The picture shows a red square on a white background with a blue circle.",
    "Algorithms and data structures: arrays, linked lists, stacks, queues, hash tables, graphs and heaps.",
    "Sorting: quicksort, merge sort and heap sort run in O(n log n) time on average.",
    "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789",
    "system user assistant You are a helpful tutor. Explain the answer step by step.",
]


def _train_tokenizer():
    """A byte-level BPE tokenizer (any text encodes) with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def qwen3vl_config(tokenizer, text: dict, vision: dict, tie_word_embeddings: bool):
    """A Qwen3VLConfig from `text`/`vision` widths, with `tokenizer`'s ids for Qwen's special tokens."""
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = {
        **text,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def _config(tokenizer):
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        # mrope_section must sum to head_dim / 2.
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,  # must equal the image processor's merge_size
        "out_hidden_size": 64,  # must equal the text hidden size
        "num_position_embeddings": 64,  # a perfect square
        "deepstack_visual_indexes": [1],  # below depth
    }
    # Untied: with tied random embeddings greedy decoding just echoes the last input token.
    return qwen3vl_config(tokenizer, text, vision, tie_word_embeddings=False)


def save_random_qwen3vl(folder: Path, make_config, max_pixels: int) -> None:
    """Seed, train the tokenizer, build `make_config(tokenizer)`'s random model and save it with its processor."""
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from agent.engine.transformers.loading import NoVideoQwen3VLProcessor

    torch.manual_seed(SEED)
    tokenizer = _train_tokenizer()
    config = make_config(tokenizer)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_config.pad_token_id
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32, max_pixels=max_pixels
    )
    processor = NoVideoQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_once(out: Path, build_into) -> Path:
    """Run `build_into(tmp)` and rename tmp to `out` (atomic; concurrent builders are fine); skip if `out` exists."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build_into(tmp)
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").exists():  # not just "another process finished first"
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_qwen3vl(out: Path) -> Path:
    """Build the tiny Qwen3-VL into `out` once (atomically) and return `out`; returns at once if it exists."""
    built = (Path(out) / "config.json").exists()
    out = build_once(out, lambda folder: save_random_qwen3vl(folder, _config, max_pixels=512 * 512))
    if not built:
        log.info("built tiny Qwen3-VL in %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a tiny random Qwen3-VL (with processor) for tests.")
    parser.add_argument("out", type=Path, help="output folder (left as it is if it already holds a model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tiny_qwen3vl(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
