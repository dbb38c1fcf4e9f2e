"""Shared prompt building: history trimming, chat-template messages, and the rendered prompt of real templates."""

from __future__ import annotations

import pytest
from PIL import Image

from agent.engine.prompt import render_prompt, template_messages, trim_history
from agent.engine.types import ImagePart, Message, TextPart


def turns(n: int) -> list[Message]:
    out = []
    for i in range(n):
        out += [Message.text("user", f"q{i}"), Message.text("assistant", f"a{i}")]
    return out


def texts(messages: list[Message]) -> list[str]:
    return [m.text_content for m in messages]


def test_trim_keeps_the_last_turns_and_the_system_prompt() -> None:
    history = [Message.text("system", "sys"), *turns(4), Message.text("user", "now")]
    assert texts(trim_history(history, 2)) == ["sys", "q3", "a3", "now"]
    assert texts(trim_history(history, 10)) == texts(history)
    assert texts(trim_history(history, 0)) == ["sys"]


def test_trim_never_starts_with_an_orphan_assistant_reply() -> None:
    history = [Message.text("assistant", "greeting"), *turns(3)]
    trimmed = trim_history(history, 2)
    assert trimmed[0].role == "user" and texts(trimmed) == ["q1", "a1", "q2", "a2"]


def test_template_messages_text_and_vision_shapes() -> None:
    image = Image.new("RGB", (4, 4))
    msg = Message(role="user", parts=(TextPart("look "), ImagePart(image), TextPart("here")))
    assert template_messages([msg], vision=False) == [{"role": "user", "content": "look here"}]
    assert template_messages([msg], vision=True) == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "look "}, {"type": "image"}, {"type": "text", "text": "here"}],
        }
    ]


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_folder)


def test_render_prompt_with_smollm_template(smollm_tokenizer) -> None:
    messages = [Message.text("system", "Be brief."), *turns(1), Message.text("user", "What is a heap?")]
    prompt = render_prompt(smollm_tokenizer, messages, vision=False)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert prompt.index("q0") < prompt.index("a0") < prompt.index("What is a heap?")
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_render_prompt_with_vision_processor(tiny_vl_folder) -> None:
    from agent.engine.transformers.loading import load_vision_processor

    processor = load_vision_processor(tiny_vl_folder)
    image = Image.new("RGB", (4, 4))
    messages = [Message(role="user", parts=(ImagePart(image), TextPart("What is this?")))]
    prompt = render_prompt(processor, messages, vision=True)
    assert prompt == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n"
    )
