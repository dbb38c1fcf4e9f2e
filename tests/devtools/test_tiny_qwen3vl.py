"""The tiny random Qwen3-VL: reproducible, loadable without torchvision, and images really reach the model."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from agent.devtools.tiny_qwen3vl import build_tiny_qwen3vl, main
from agent.engine.transformers.loading import load_vision_processor, set_pixel_budget

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tiny_vl_folder):
    from transformers import AutoModelForImageTextToText

    processor = load_vision_processor(tiny_vl_folder)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_folder, dtype=torch.float32).eval()
    return processor, model


def prompt(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def greedy(processor, model, image: Image.Image) -> list[int]:
    inputs = processor(text=[prompt(processor)], images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_small_and_reproducible(tiny_vl_folder, tmp_path) -> None:
    weights = tiny_vl_folder / "model.safetensors"
    assert weights.stat().st_size < 2_000_000
    started = time.monotonic()
    assert build_tiny_qwen3vl(tiny_vl_folder) == tiny_vl_folder  # already built: returns at once
    assert time.monotonic() - started < 0.5
    assert main([str(tmp_path / "again")]) == 0  # the `python -m agent.devtools.tiny_qwen3vl OUT` entry point
    assert not list(tmp_path.glob("again.tmp-*"))  # built in a temp dir, then renamed
    first, second = load_file(weights), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_processor_loads_without_torchvision(tiny) -> None:
    processor, model = tiny
    assert type(processor).__name__ == "NoVideoQwen3VLProcessor"
    assert processor.image_processor.merge_size == model.config.vision_config.spatial_merge_size
    assert processor.image_token_id == model.config.image_token_id
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt(processor)


def test_image_tokens_depend_on_size_and_budget(tiny) -> None:
    processor, model = tiny

    def image_tokens(image: Image.Image) -> int:
        ids = processor(text=[prompt(processor)], images=[image], return_tensors="pt")["input_ids"]
        return int((ids == model.config.image_token_id).sum())

    set_pixel_budget(processor, 32 * 32, 512 * 512)
    assert image_tokens(noise(64, 64, 0)) == 4  # one token per 32x32 px
    assert image_tokens(noise(256, 128, 0)) == 32
    set_pixel_budget(processor, 32 * 32, 128 * 128)
    assert image_tokens(noise(256, 128, 0)) <= 16
    assert image_tokens(noise(2000, 2000, 0)) <= 16


def test_different_images_give_different_outputs(tiny) -> None:
    processor, model = tiny
    set_pixel_budget(processor, 32 * 32, 512 * 512)
    outputs = {tuple(greedy(processor, model, image)) for image in (noise(64, 64, 1), noise(64, 64, 2))}
    assert len(outputs) == 2
    assert greedy(processor, model, noise(64, 64, 1)) == greedy(processor, model, noise(64, 64, 1))
