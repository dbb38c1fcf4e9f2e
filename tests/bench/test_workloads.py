"""The workloads send what they claim: distinct random prompts near the asked length, and tutor sessions that
legitimately share their history."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.workloads import TUTOR_SYSTEM, random_prompt, random_workload, tutor_conversation, tutor_workload


def test_random_prompts_are_distinct_from_their_first_word_on() -> None:
    prompts = [random_prompt(i, 128) for i in range(200)]
    assert len(set(prompts)) == 200
    # No two share more than the word "Request": nothing for a prefix cache to reuse between them.
    firsts = {tuple(p.split()[:2]) for p in prompts}
    assert len(firsts) == 200


def test_random_prompts_are_seeded() -> None:
    assert random_prompt(3, 64, seed=1) == random_prompt(3, 64, seed=1)
    assert random_prompt(3, 64, seed=1) != random_prompt(3, 64, seed=2)
    workload = random_workload(64, seed=1)
    assert workload.messages(5) == workload.messages(5) == [{"role": "user", "content": random_prompt(5, 64, 1)}]
    assert not workload.prefix_reuse


@pytest.mark.parametrize("target", [64, 128, 256])
def test_random_prompts_are_near_the_target_length_in_model_tokens(smollm_folder: Path, target: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm_folder))
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    lengths = [count(random_workload(target, count=count).messages(i)[0]["content"]) for i in range(20)]
    # The words are sized to `target`; the closing instruction adds ~9 tokens.
    assert all(target <= n <= target + 16 for n in lengths), lengths


def test_tutor_conversation_shape() -> None:
    for i in range(24):
        messages = tutor_conversation(i)
        assert messages[0] == {"role": "system", "content": TUTOR_SYSTEM}
        earlier = messages[1:-1]
        assert 3 <= len(earlier) // 2 <= 5 and len(earlier) % 2 == 0
        assert [m["role"] for m in earlier] == ["user", "assistant"] * (len(earlier) // 2)
        assert messages[-1]["role"] == "user"


def test_tutor_sessions_share_their_history_and_differ_from_each_other() -> None:
    workload = tutor_workload(sessions=8)
    assert workload.prefix_reuse
    assert workload.messages(1)[:-1] == workload.messages(9)[:-1]  # the same session, a later question
    assert workload.messages(1)[-1] != workload.messages(9)[-1]
    assert workload.messages(1)[:-1] != workload.messages(2)[:-1]
