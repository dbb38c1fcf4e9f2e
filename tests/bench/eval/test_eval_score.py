"""The eval's scorer on fixed answers: every expected answer scores, wrong and evasive ones do not."""

from __future__ import annotations

import pytest

from bench.eval.score import Question, first_big_o, is_correct, load_questions, normalize_big_o, score

QUESTIONS = load_questions()


def test_the_task_set_is_well_formed() -> None:
    assert 45 <= len(QUESTIONS) <= 60
    assert len({q.id for q in QUESTIONS}) == len(QUESTIONS)
    assert {q.kind for q in QUESTIONS} == {"complexity", "output", "number", "text"}
    assert all(q.answer in q.choices for q in QUESTIONS if q.kind == "text")


def test_every_expected_answer_scores_and_an_empty_one_does_not() -> None:
    perfect = score(QUESTIONS, {q.id: q.answer for q in QUESTIONS})
    assert perfect["correct"] == perfect["questions"] == len(QUESTIONS) and perfect["accuracy"] == 1.0
    empty = score(QUESTIONS, {})
    assert empty["correct"] == 0 and set(empty["by_kind"].values()) == {0.0}


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ("O(n log n)", True),
        ("The average case is O(n lg n).", True),
        ("Θ(N * log2 N) on average", True),
        ("O(n^2)", False),
        ("It is O(n^2) in the worst case, O(n log n) on average.", False),  # the first complexity named counts
        ("n log n", False),  # no big-O given
    ],
)
def test_complexity_answers(answer: str, right: bool) -> None:
    quicksort = next(q for q in QUESTIONS if q.answer == "O(n log n)")
    assert is_correct(quicksort, answer) is right


def test_sums_in_any_order_and_aliases() -> None:
    bfs = Question("x", "complexity", "BFS?", "O(V + E)")
    assert is_correct(bfs, "O(E+V)") and not is_correct(bfs, "O(V * E)")
    bellman = next(q for q in QUESTIONS if "Bellman" in q.question)
    assert is_correct(bellman, "O(E V)") and is_correct(bellman, "O(V*E)")


def test_numbers_outputs_and_choices() -> None:
    edges = Question("e", "number", "edges?", "9")
    assert is_correct(edges, "9 edges (a tree on 10 vertices has n - 1)") and not is_correct(edges, "10 vertices, so 9")
    reverse = Question("r", "output", "print?", "cba")
    assert is_correct(reverse, "```\ncba\n```") and is_correct(reverse, "Output: cba")
    assert not is_correct(reverse, "abc")
    listing = Question("l", "output", "print?", "[3, 2, 1]")
    assert is_correct(listing, "[3,  2, 1]") and not is_correct(listing, "[1, 2, 3]")
    fifo = Question("q", "text", "FIFO?", "queue", choices=("stack", "queue"))
    assert is_correct(fifo, "A queue.") and not is_correct(fifo, "A stack, not a queue.")
    order = Question("o", "text", "sorted?", "in-order", ("inorder",), ("pre-order", "in-order", "post-order"))
    assert is_correct(order, "Inorder traversal") and not is_correct(order, "post-order")


def test_big_o_helpers() -> None:
    assert first_big_o("takes O(n (log n)) steps") == "O(n (log n))"
    assert first_big_o("no complexity here") is None
    assert normalize_big_o("O(N ** 2)") == normalize_big_o("O(n^2)")
