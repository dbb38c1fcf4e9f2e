"""`make eval`'s runner asks every question through a real `/v1` door and scores the replies."""

from __future__ import annotations

import argparse
import asyncio
import threading
from pathlib import Path

import uvicorn

from agent.config import load_settings
from agent.engine.fake import FakeEngine
from agent.serving.model_server import create_app
from bench.eval.__main__ import ask_all, evaluate, lm_eval_score
from bench.eval.score import Question, load_questions
from tests.serving.live import serving


async def test_every_question_is_asked_and_answered(tmp_path: Path) -> None:
    engine = FakeEngine()
    await engine.start()
    questions = load_questions()[:6]
    async with serving(create_app(load_settings(history_db=tmp_path / "h.sqlite3"), engine)) as url:
        answers = await ask_all(url, "fake", questions, max_tokens=64, concurrency=3)
    assert set(answers) == {q.id for q in questions}
    # FakeEngine echoes the last user message: the prompt template and the question came through the door.
    assert all(a.startswith("echo: Answer with only the final answer") for a in answers.values())


async def test_a_failing_server_scores_zero_not_a_crash(tmp_path: Path) -> None:
    questions = [Question("q1", "number", "How many?", "3")]
    answers = await ask_all("http://127.0.0.1:9", "x", questions, max_tokens=8, concurrency=1)  # nothing listens
    assert answers == {"q1": ""}


def test_evaluate_scores_a_server_and_skips_a_missing_lm_eval(tmp_path: Path) -> None:
    engine = FakeEngine()
    app = create_app(load_settings(history_db=tmp_path / "h.sqlite3"), engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)  # evaluate() runs its own event loop
    asyncio.run(engine.start())
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    # An echo of "How many ...? 7" answers 7: the scorer reads the first integer of the reply.
    questions = [Question("a", "number", "7", "7"), Question("b", "number", "8", "9")]
    args = argparse.Namespace(max_tokens=16, concurrency=2, lm_eval=True, lm_eval_venv=tmp_path / "none", out=tmp_path)
    try:
        result = evaluate(url, "fake", args, questions, "fake")
    finally:
        server.should_exit = True
        thread.join(10)
    assert (result["correct"], result["questions"], result["lm_eval_acc"]) == (1, 2, None)
    assert lm_eval_score(tmp_path / "none", url, "fake", tmp_path) is None
