"""Hooks of the lm-evaluation-harness task: the prompt and the scoring of bench/eval/score.py (stdlib only, so it
imports inside lm-eval's own virtual environment)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for bench.eval.score

from bench.eval.score import PROMPT, Question, is_correct


def _question(doc: dict) -> Question:
    return Question(
        id=doc["id"],
        kind=doc["kind"],
        question=doc["question"],
        answer=doc["answer"],
        aliases=tuple(doc.get("aliases") or ()),
        choices=tuple(doc.get("choices") or ()),
    )


def doc_to_text(doc: dict) -> str:
    return PROMPT.format(question=doc["question"])


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    return {"acc": int(is_correct(_question(doc), results[0]))}
