"""Prefix-cache affinity against round-robin: a multi-turn workload over two servers of the ONNX int4 engine.

20 learners hold 5-turn conversations (each turn sends the conversation so far, as `/v1` clients do), spread over
two servers, once routed with affinity and once round-robin:
- affinity: the server is `HashRing(servers).order(routing_key(request))[0]`, the same ring and key the gateway uses
  over several Tritons (agent/serving/triton/routing.py): every turn of a conversation lands where its earlier
  turns' prompts are cached;
- round-robin: request i goes to server i mod 2, whatever its conversation.

The servers are two Triton doors (`dsa-agent triton`, LOADING_STRATEGY=onnx, QUANTIZATION_TYPE=int4), and the
routing is the gateway's own: two FastAPI gateways (`dsa-agent serve`, LOADING_STRATEGY=triton, TRITON_GRPC_URL=
both), one with TRITON_ROUTING=affinity and one with round_robin; the client sends each policy's requests to its
gateway over `/v1/chat/completions`, as a user would. Hit rate = cached prompt tokens (both Tritons'
`dsa_triton_prefix_cached_tokens_total`, before/after) / prompt tokens (the answers' `usage.prompt_tokens`). TTFT is
the first streamed content as the client sees it; server CPU is the CPU time both Tritons' process trees used during the
run (/proc), the work done, which other load on the machine changes far less than it changes wall times. The
policies run alternately (A B B A ... with --repeats), each run on fresh conversations, so load on the machine hits
both alike.

    python -m bench.affinity [--conversations 20] [--turns 5] [--tokens 16] [--concurrency 4] [--repeats 2]
Output: bench/results/<date>-affinity.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from agent.serving.triton.metrics import PREFIX_CACHED_METRIC, parse_samples
from bench.load import delta_text, openai_events
from bench.targets import fastapi_door, free_port, triton_door

log = logging.getLogger("bench.affinity")
RESULTS = Path(__file__).parent / "results"
POLICIES = ("affinity", "round_robin")
CACHED_METRIC = PREFIX_CACHED_METRIC
REQUESTS_METRIC = "nv_inference_request_success"  # Triton's own count of answered requests
SYSTEM = (
    "You are a patient tutor for a data-structures course. Answer in plain words, give one short example, and end "
    "with a question that checks the learner understood. Keep answers brief."
)
TOPICS = (
    "binary heaps", "hash tables", "red-black trees", "tries", "skip lists", "B-trees", "union-find",
    "segment trees", "Fenwick trees", "AVL trees", "circular buffers", "deques", "bloom filters", "linked lists",
    "adjacency lists", "priority queues", "splay trees", "suffix arrays", "LRU caches", "dynamic arrays",
)  # fmt: skip
FOLLOW_UPS = (
    "Can you show how {topic} behave when I insert the values 42, 7, 19, 3 and 25 one after the other, step by step?",
    "What is the time complexity of the main operations on {topic}, and why, in the worst case and on average?",
    "When would I choose {topic} over the simpler structure we saw in the first lecture? Give me a concrete case.",
    "I wrote an implementation of {topic} and it is slow on large inputs. What mistakes do students usually make?",
)


def conversations(count: int, turns: int, run: int = 0) -> list[list[str]]:
    """`count` conversations of `turns` learner messages each; `run` makes the openings distinct between runs (so a
    run finds none of an earlier run's conversations in the caches, only the shared system prompt)."""
    if turns < 1 or count < 1:
        raise ValueError("conversations and turns must be at least 1")
    out = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        opening = f"I am learner {run * count + i} and I have an exam on {topic} next week. What are {topic}?"
        out.append([opening] + [FOLLOW_UPS[(i + t) % len(FOLLOW_UPS)].format(topic=topic) for t in range(turns - 1)])
    return out


def run_order(repeats: int) -> list[str]:
    """A B B A A B ...: each policy runs as often first as second, so a drift in the machine's load hits both."""
    return [p for r in range(repeats) for p in (POLICIES if r % 2 == 0 else POLICIES[::-1])]


def hit_rate(cached_tokens: int, prompt_tokens: int) -> float:
    """Cached prompt tokens over prompt tokens (0 with no prompt tokens)."""
    if cached_tokens < 0 or prompt_tokens < 0 or cached_tokens > prompt_tokens:
        raise ValueError(f"cached {cached_tokens} and prompt {prompt_tokens} tokens are inconsistent")
    return cached_tokens / prompt_tokens if prompt_tokens else 0.0


@dataclass
class Turn:
    prompt_tokens: int
    ttft_s: float
    e2e_s: float


@dataclass
class RunResult:
    policy: str
    requests: int
    errors: int
    prompt_tokens: int
    cached_tokens: int
    hit_rate: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    total_s: float
    per_server: dict[str, int] = field(default_factory=dict)
    load_1m: float = 0.0  # the machine's 1-minute load average when the run ended
    server_cpu_s: float = 0.0  # CPU time both servers used during the run: the work, whatever else ran meanwhile


def summarize(
    policy: str, turns: list[Turn], errors: int, cached_tokens: int, total_s: float, per_server: Sequence[int] = ()
) -> RunResult:
    """One run's figures from its turns, the servers' cached-token counters (after - before, summed) and the
    requests each server answered (after - before)."""
    prompt = sum(t.prompt_tokens for t in turns)
    ttfts = sorted(t.ttft_s for t in turns)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))] if ttfts else float("nan")
    return RunResult(
        policy=policy,
        requests=len(turns),
        errors=errors,
        prompt_tokens=prompt,
        cached_tokens=cached_tokens,
        hit_rate=round(hit_rate(cached_tokens, prompt), 4),
        ttft_p50_ms=round(1000 * statistics.median(ttfts), 1) if ttfts else float("nan"),
        ttft_p95_ms=round(1000 * p95, 1),
        total_s=round(total_s, 2),
        per_server={f"server{i}": int(n) for i, n in enumerate(per_server)},
    )


def paired_ratios(runs: list[RunResult]) -> dict[str, float]:
    """Affinity over round-robin within each pair of consecutive runs (A B, B A, ...), the median over the pairs:
    each pair ran minutes apart, so a load that drifts over the whole run cancels better than in the medians."""
    ttft, total, cpu = [], [], []
    for a, b in zip(runs[::2], runs[1::2], strict=False):
        if {a.policy, b.policy} != set(POLICIES):
            continue
        aff, rr = (a, b) if a.policy == "affinity" else (b, a)
        ttft.append(aff.ttft_p50_ms / rr.ttft_p50_ms)
        total.append(aff.total_s / rr.total_s)
        cpu.append(aff.server_cpu_s / rr.server_cpu_s if rr.server_cpu_s else float("nan"))
    if not ttft:
        return {}
    return {
        "pairs": len(ttft),
        "ttft_p50": round(statistics.median(ttft), 3),
        "total_time": round(statistics.median(total), 3),
        "server_cpu": round(statistics.median(cpu), 3),
    }


def combine(runs: list[RunResult]) -> dict[str, dict[str, float]]:
    """Per policy over its repeats: token-weighted hit rate, median of the runs' TTFT p50 and total time."""
    out: dict[str, dict[str, float]] = {}
    for policy in POLICIES:
        mine = [r for r in runs if r.policy == policy]
        if not mine:
            continue
        out[policy] = {
            "runs": len(mine),
            "requests": sum(r.requests for r in mine),
            "errors": sum(r.errors for r in mine),
            "hit_rate": round(hit_rate(sum(r.cached_tokens for r in mine), sum(r.prompt_tokens for r in mine)), 4),
            "ttft_p50_ms": round(statistics.median(r.ttft_p50_ms for r in mine), 1),
            "total_s": round(statistics.median(r.total_s for r in mine), 2),
            "server_cpu_s": round(statistics.median(r.server_cpu_s for r in mine), 2),
        }
    return out


def report(meta: dict, runs: list[RunResult]) -> str:
    """The Markdown table of bench/results/<date>-affinity.md."""
    summary = combine(runs)
    lines = [
        f"# Prefix-cache affinity vs round-robin: {meta['conversations']} conversations x {meta['turns']} turns over "
        f"2 servers (ONNX int4, {meta['tokens']} tokens out, {meta['concurrency']} conversations at once)",
        "",
        f"Machine: {meta['cpus']} CPUs, load average {meta['load_before']} before / {meta['load_after']} after "
        "(shared with other work: compare the two policies, which ran alternately, not absolute times).",
        "",
        "| policy | runs | requests | errors | prefix-cache hit rate | TTFT p50 ms | total s | server CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, s in summary.items():
        lines.append(
            f"| {policy} | {s['runs']} | {s['requests']} | {s['errors']} | {100 * s['hit_rate']:.1f} % "
            f"| {s['ttft_p50_ms']} | {s['total_s']} | {s['server_cpu_s']} |"
        )
    pairs = paired_ratios(runs)
    if pairs:
        a, r = summary["affinity"], summary["round_robin"]
        lines += [
            "",
            f"Affinity / round-robin, median over {pairs['pairs']} back-to-back pair(s) of runs: TTFT p50 "
            f"x{pairs['ttft_p50']:.2f}, total time x{pairs['total_time']:.2f}, server CPU "
            f"x{pairs['server_cpu']:.2f}; hit rate {100 * a['hit_rate']:.1f} % vs {100 * r['hit_rate']:.1f} %.",
        ]
    lines += [
        "",
        "| run | policy | prompt tokens | cached | hit rate | TTFT p50 ms | TTFT p95 ms | total s | server CPU s "
        "| load 1m | split |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(runs):
        split = ", ".join(f"{k} {v}" for k, v in r.per_server.items())
        lines.append(
            f"| {i} | {r.policy} | {r.prompt_tokens} | {r.cached_tokens} | {100 * r.hit_rate:.1f} % "
            f"| {r.ttft_p50_ms} | {r.ttft_p95_ms} | {r.total_s} | {r.server_cpu_s} | {r.load_1m} | {split} |"
        )
    return "\n".join(lines) + "\n"


# --- the run ------------------------------------------------------------------------------------------------------


async def _counters(client: httpx.AsyncClient, metrics: Sequence[str]) -> tuple[int, list[int]]:
    """(cached prompt tokens of both Tritons, requests each answered) from their metrics ports."""
    cached, requests = 0.0, []
    for url in metrics:
        resp = await client.get(url)
        resp.raise_for_status()
        cached += sum(v for _, v in parse_samples(resp.text, CACHED_METRIC))
        requests.append(int(sum(v for _, v in parse_samples(resp.text, REQUESTS_METRIC))))
    return int(cached), requests


async def _turn(client: httpx.AsyncClient, server: str, messages: list[dict[str, str]], tokens: int) -> tuple:
    body = {
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": True,  # every answer is exactly `tokens` long: the policies do the same work
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, text, prompt_tokens = None, [], 0
    async for event in openai_events(client, f"{server}/v1/chat/completions", body):
        if event.get("usage"):
            prompt_tokens = event["usage"]["prompt_tokens"]
        if content := delta_text(event):
            first = first or time.perf_counter()
            text.append(content)
    if first is None or not prompt_tokens:
        raise RuntimeError(f"{server}: no content or no usage in the stream")
    turn = Turn(prompt_tokens, first - started, time.perf_counter() - started)
    return turn, "".join(text)


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    """User + system CPU seconds of the live processes `roots` and all their descendants (Triton's server and
    python-backend stubs run in sessions of their own, so a process group would miss them)."""
    total = 0.0
    for root in roots:
        try:
            procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


async def run_policy(
    policy: str,
    gateway: str,
    metrics: Sequence[str],
    convs: list[list[str]],
    tokens: int,
    concurrency: int,
    roots: Sequence[int] = (),
) -> RunResult:
    """Every conversation through `gateway`, `concurrency` at a time, each turn after the previous answer."""
    turns: list[Turn] = []
    errors = 0
    queue = iter(convs)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:

        async def learner() -> None:
            nonlocal errors
            for questions in queue:
                messages = [{"role": "system", "content": SYSTEM}]
                for question in questions:
                    messages.append({"role": "user", "content": question})
                    try:
                        turn, answer = await _turn(client, gateway, messages, tokens)
                    except (httpx.HTTPError, RuntimeError) as exc:
                        errors += 1
                        log.warning("%s: turn failed: %r", policy, exc)
                        break  # the conversation cannot go on without its answer
                    turns.append(turn)
                    messages.append({"role": "assistant", "content": answer})

        (cached0, served0), cpu_before = await _counters(client, metrics), tree_cpu_seconds(roots)
        started = time.perf_counter()
        await asyncio.gather(*(learner() for _ in range(concurrency)))
        total = time.perf_counter() - started
        cached1, served1 = await _counters(client, metrics)
    result = summarize(
        policy, turns, errors, cached1 - cached0, total, [b - a for a, b in zip(served0, served1, strict=True)]
    )
    result.load_1m = round(os.getloadavg()[0], 2)
    result.server_cpu_s = round(tree_cpu_seconds(roots) - cpu_before, 2)
    log.info("%s", result)
    return result


async def _warm(gateways: Sequence[str], tokens: int) -> None:
    """Requests on the shared system prompt through the round-robin gateway: both Tritons then start with it cached."""
    async with httpx.AsyncClient(timeout=600) as client:
        for gateway in gateways:
            for _ in range(2):
                await _turn(client, gateway, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
                            tokens)  # fmt: skip


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--turns", type=int, default=5, help="learner messages per conversation")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--concurrency", type=int, default=4, help="conversations in progress at once")
    parser.add_argument("--repeats", type=int, default=2, help="runs per policy, alternating")
    parser.add_argument("--label", default="affinity")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    env = {"LOADING_STRATEGY": "onnx", "QUANTIZATION_TYPE": "int4"}
    load_before = _load()
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        grpc, metrics, roots = [], [], []
        for i in range(2):
            http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
            proc = stack.enter_context(triton_door(http_port, grpc_port, metrics_port, env, Path(tmp) / f"t{i}.log"))
            grpc.append(f"127.0.0.1:{grpc_port}")
            metrics.append(f"http://127.0.0.1:{metrics_port}/metrics")
            roots.append(proc.pid)  # each server's process tree: its CPU time is the work done
        gateways = {}
        for policy in POLICIES:
            port = free_port()
            gateway_env = {
                "LOADING_STRATEGY": "triton",
                "TRITON_GRPC_URL": ",".join(grpc),
                "TRITON_METRICS_PORT": metrics[0].rsplit(":", 1)[1].removesuffix("/metrics"),
                "TRITON_ROUTING": policy,
                "HISTORY_DB": str(Path(tmp) / f"history-{policy}.sqlite3"),
            }
            stack.enter_context(fastapi_door(port, gateway_env, Path(tmp) / f"gateway-{policy}.log"))
            gateways[policy] = f"http://127.0.0.1:{port}"
        asyncio.run(_warm([gateways["round_robin"]], args.tokens))
        for run, policy in enumerate(run_order(args.repeats)):
            convs = conversations(args.conversations, args.turns, run=run)
            runs.append(
                asyncio.run(run_policy(policy, gateways[policy], metrics, convs, args.tokens, args.concurrency, roots))
            )
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "conversations": args.conversations,
        "turns": args.turns,
        "tokens": args.tokens,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "servers": "2 x dsa-agent triton (LOADING_STRATEGY=onnx QUANTIZATION_TYPE=int4) behind a FastAPI gateway "
        "per policy (TRITON_ROUTING)",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_before": load_before,
        "load_after": _load(),
    }
    stem = RESULTS / f"{dt.date.today().isoformat()}-{args.label}"
    stem.with_suffix(".json").write_text(
        json.dumps(
            {**meta, "summary": combine(runs), "paired_ratios": paired_ratios(runs), "runs": [asdict(r) for r in runs]},
            indent=2,
        )
        + "\n"
    )
    text = report(meta, runs)
    stem.with_suffix(".md").write_text(text)
    log.info("\n%s", text)
    return 0 if all(r.errors == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
