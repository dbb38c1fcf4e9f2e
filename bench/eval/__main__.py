"""`make eval`: the data-structures task set (dsa_questions.jsonl) through the FastAPI door `/v1`, once per engine
(and llama-server on the same GGUF when it is built), greedy; prints the accuracy per engine and writes
bench/results/<date>-<machine>-eval.json.

With --lm-eval (what `make eval` passes), lm-evaluation-harness (`local-chat-completions`) also runs the same
questions through the same door, from its own virtual environment (LM_EVAL_VENV, default
<model cache>/tools/lm-eval-venv, made by `make lm-eval-venv`: lm-eval needs numpy 2 for its pyarrow, and the app's
.venv must keep numpy 1.26 for Triton's stub, so it never goes into .venv).

    python -m bench.eval --engines onnx_int4 onnx_int8
    python -m bench.eval --base-url http://127.0.0.1:8000   # a server that is already running
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

import httpx

from agent.engine.cpu import usable_cores
from bench import suite
from bench.eval.score import PROMPT, Question, load_questions, score
from bench.targets import fastapi_door, free_port

log = logging.getLogger("bench.eval")
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


async def ask_all(
    base_url: str, model: str, questions: list[Question], max_tokens: int, concurrency: int
) -> dict[str, str]:
    """Every question once through `/v1/chat/completions` (greedy); the reply text per question id ("" on error)."""
    answers: dict[str, str] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:

        async def one(q: Question) -> None:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROMPT.format(question=q.question)}],
                "max_tokens": max_tokens,
                "temperature": 0.0,
            }
            async with gate:
                try:
                    resp = await client.post("/v1/chat/completions", json=body)
                    resp.raise_for_status()
                    answers[q.id] = resp.json()["choices"][0]["message"]["content"] or ""
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    log.warning("%s: %s", q.id, exc)
                    answers[q.id] = ""

        await asyncio.gather(*(one(q) for q in questions))
    return answers


def lm_eval_score(venv: Path, base_url: str, model: str, out: Path) -> float | None:
    """lm-evaluation-harness's accuracy on the same task through the same door, or None if it is not installed."""
    exe = venv / "bin" / "lm_eval"
    if not exe.exists():
        log.warning("lm-eval not found at %s (see bench/eval/__main__.py): skipped", exe)
        return None
    model_args = f"model={model},base_url={base_url}/v1/chat/completions,num_concurrent=4,tokenized_requests=False"
    cmd = [str(exe), "--model", "local-chat-completions", "--model_args", model_args]
    cmd += ["--include_path", "bench/eval/harness", "--tasks", "dsa_questions", "--apply_chat_template"]
    cmd += ["--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # the task's data is a local file
    try:
        subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    except subprocess.CalledProcessError as exc:  # our own score still stands; say why lm-eval's is missing
        log.error("lm-eval failed (%s): its score is left out", exc)
        return None
    found = sorted(out.rglob("results_*.json"))
    if not found:
        return None
    return json.loads(found[-1].read_text())["results"]["dsa_questions"]["acc,none"]


def evaluate(base_url: str, model: str, args: argparse.Namespace, questions: list[Question], tag: str) -> dict:
    answers = asyncio.run(ask_all(base_url, model, questions, args.max_tokens, args.concurrency))
    result = score(questions, answers)
    if args.lm_eval:
        out = args.out / "eval-logs" / f"lm-eval-{tag}"
        result["lm_eval_acc"] = lm_eval_score(args.lm_eval_venv, base_url, model, out)
    result["answers"] = answers
    log.info("%s: %d/%d (%.0f %%)", tag, result["correct"], result["questions"], 100 * result["accuracy"])
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="*", default=suite.available_engines(), choices=suite.ENGINES)
    parser.add_argument("--peers", nargs="*", default=["llama_server"], choices=["llama_server"])
    parser.add_argument("--base-url", help="score this running OpenAI-compatible server instead of starting doors")
    parser.add_argument("--model", default="", help="the model name to send with --base-url")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lm-eval", action="store_true", help="also run lm-evaluation-harness on the same door")
    parser.add_argument("--lm-eval-venv", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from agent.config import load_settings
    from agent.engine.checkpoints import embedded_gguf, resolve_model

    cache = load_settings().model_cache_dir
    args.lm_eval_venv = args.lm_eval_venv or Path(os.environ.get("LM_EVAL_VENV", cache / "tools" / "lm-eval-venv"))
    questions = load_questions()
    logs = args.out / "eval-logs"
    scores: dict[str, dict] = {}
    if args.base_url:
        scores["server"] = evaluate(args.base_url, args.model, args, questions, "server")
    else:
        name = resolve_model(None, cache).name
        dtype = suite.fastest_dtype()
        for engine in args.engines:
            port = free_port()
            with fastapi_door(port, suite.engine_env(engine, dtype), logs / f"eval-{engine}.log"):
                scores[engine] = evaluate(f"http://127.0.0.1:{port}", name, args, questions, engine)
        if "llama_server" in args.peers:
            from bench.peers import llama_server

            binary = llama_server.install_dir(cache) / "llama-server"
            if binary.exists():
                port, cores = free_port(), usable_cores()
                with llama_server.llama_server(binary, embedded_gguf(), port, cores, 4, 4096, logs / "eval-llama.log"):
                    scores["llama_server"] = evaluate(f"http://127.0.0.1:{port}", "", args, questions, "llama_server")
            else:
                log.warning("llama-server not built (make bench builds it): skipped")
    print(f"{'engine':<16} {'score':>9}  by kind")
    for engine, s in scores.items():
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in s["by_kind"].items())
        extra = f"  lm-eval {s['lm_eval_acc']:.3f}" if s.get("lm_eval_acc") is not None else ""
        print(f"{engine:<16} {s['correct']:>3}/{s['questions']:<3} {s['accuracy']:.2f}  {kinds}{extra}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{dt.date.today().isoformat()}-{platform.node() or 'machine'}-eval.json"
    path.write_text(json.dumps({"max_tokens": args.max_tokens, "scores": scores}, indent=2) + "\n")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
