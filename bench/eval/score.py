"""Score short answers to the data-structures questions in dsa_questions.jsonl.

Each question has a kind, and each kind is checked the way a grader would read the answer, not by exact string:
- `complexity`: the first big-O expression in the answer, normalised (case, spaces, `*`, `lg`/`log2` -> `log`,
  `**` -> `^`, the order of a sum), equals the expected one or an alias;
- `output`, `number`: the expected text is the first thing the answer says that looks like a value (the first
  integer for numbers; for other outputs the expected text, whitespace-normalised, appears in the answer's first
  line or code block);
- `text`: of the question's choices, the first one the answer names is the expected one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

QUESTIONS = Path(__file__).with_name("dsa_questions.jsonl")
PROMPT = "Answer with only the final answer, no explanation.\n\n{question}"


@dataclass(frozen=True)
class Question:
    id: str
    kind: str
    question: str
    answer: str
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()

    @property
    def expected(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)


def load_questions(path: Path = QUESTIONS) -> list[Question]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row["aliases"] = tuple(row.get("aliases", ()))
            row["choices"] = tuple(row.get("choices", ()))
            out.append(Question(**row))
    return out


def normalize_big_o(text: str) -> str:
    """`O(n * lg n)` -> `o(nlogn)`: the spelling differences that do not change the answer."""
    s = text.lower().replace("θ", "o").replace("**", "^").replace("*", "").replace("·", "")
    s = re.sub(r"\\?log_?\{?2\}?|\blg\b", "log", s)
    s = re.sub(r"\s+", "", s).replace("log(n)", "logn").replace("log(v)", "logv")
    inner = s[2:-1] if s.startswith("o(") and s.endswith(")") else ""
    if "+" in inner and "(" not in inner:  # O(E + V) is O(V + E)
        s = "o(" + "+".join(sorted(inner.split("+"))) + ")"
    return s


def first_big_o(answer: str) -> str | None:
    """The first `O(...)` (or `Θ(...)`) in the answer, with balanced parentheses."""
    match = re.search(r"[OΘoθ]\s*\(", answer)
    if not match:
        return None
    depth, start = 0, match.start()
    for i in range(match.end() - 1, len(answer)):
        depth += {"(": 1, ")": -1}.get(answer[i], 0)
        if depth == 0:
            return answer[start : i + 1]
    return None


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip("`'\"").strip()).lower()


def _first_block(answer: str) -> str:
    """The answer's first non-empty line, or the first line inside a ``` block if it opens with one."""
    lines = [ln for ln in answer.strip().splitlines() if ln.strip() and not ln.strip().startswith("```")]
    return lines[0] if lines else ""


def is_correct(question: Question, answer: str) -> bool:
    """Whether `answer` (a model's reply) gives the expected answer to `question`."""
    if question.kind == "complexity":
        found = first_big_o(answer)
        return found is not None and normalize_big_o(found) in {normalize_big_o(e) for e in question.expected}
    if question.kind == "number":
        found = re.search(r"-?\d+", answer)
        return found is not None and found.group() in question.expected
    if question.kind == "output":
        line = _squash(_first_block(answer))
        expected = [_squash(e) for e in question.expected]
        if expected[0].lstrip("-").isdigit():  # a numeric output: the first integer of the answer
            found = re.search(r"-?\d+", line)
            return found is not None and found.group() in expected
        return any(line == e or re.search(rf"(^|[\s:`'\"]){re.escape(e)}($|[\s.`'\"])", line) for e in expected)
    if question.kind == "text":
        text = answer.lower()
        positions = {c: m.start() for c in question.choices if (m := re.search(rf"\b{re.escape(c)}\b", text))}
        for alias in question.expected:  # spelling variants of the expected choice count as it
            if (m := re.search(rf"\b{re.escape(alias.lower())}\b", text)) and question.answer not in positions:
                positions[question.answer] = m.start()
        return bool(positions) and min(positions, key=positions.__getitem__) == question.answer
    raise ValueError(f"unknown question kind {question.kind!r} ({question.id})")


def score(questions: Iterable[Question], answers: dict[str, str]) -> dict:
    """Accuracy overall and per kind; a question without an answer counts as wrong."""
    per_kind: dict[str, list[int]] = {}
    for q in questions:
        per_kind.setdefault(q.kind, []).append(int(is_correct(q, answers.get(q.id, ""))))
    total = [x for xs in per_kind.values() for x in xs]
    return {
        "accuracy": round(sum(total) / len(total), 3) if total else 0.0,
        "correct": sum(total),
        "questions": len(total),
        "by_kind": {k: round(sum(xs) / len(xs), 3) for k, xs in sorted(per_kind.items())},
    }
