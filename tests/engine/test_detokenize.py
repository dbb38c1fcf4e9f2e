"""Incremental detokenization (never a broken UTF-8 character) and stop strings."""

from __future__ import annotations

import pytest

from agent.engine.detokenize import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(smollm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_folder)


TEXTS = ["A binary tree 🌳 has nodes.", "二叉树是一种数据结构", "naïve café — ok", "  two  spaces"]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_rebuild_text_without_broken_characters(tokenizer, text: str) -> None:
    prompt = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode())  # byte-level BPE: some characters span several tokens
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    if any(ord(c) > 0xFFFF for c in text):  # the emoji needs more than one token: some pushes must wait
        assert "" in deltas


def test_special_tokens_are_not_emitted(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [])
    out = "".join(detok.push(i) for i in tokenizer("Hi<|im_end|>", add_special_tokens=False)["input_ids"])
    assert out == "Hi"


def test_stop_string_split_across_deltas() -> None:
    stop = StopMatcher(["###", "END"])
    emitted = [stop.feed(d) for d in ["Hello #", "#", " world"]]
    assert emitted == ["Hello ", "", "## world"] and not stop.stopped
    assert stop.feed(" and E") == " and "
    assert stop.feed("ND more") == ""
    assert stop.stopped


def test_stop_string_inside_one_delta_and_flush() -> None:
    stop = StopMatcher(["\n\n"])
    assert stop.feed("line one\n") == "line one"
    assert stop.flush() == "\n"
    assert StopMatcher(["x"]).feed("abxcd") == "ab"
    assert StopMatcher([]).feed("anything") == "anything"
