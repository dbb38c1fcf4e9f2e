"""What structured output costs, through a door: inter-token latency with a JSON-schema constraint vs without, and
schema compile time (issue 18; part of `make bench`).

The engine runs behind the FastAPI door (`dsa-agent serve`, a separate server process, ONNX int4 on the embedded
SmolLM2 by default); this process is the client, streaming `/v1/chat/completions` as any OpenAI client does. At each
concurrency level, `concurrency` clients send requests of exactly --tokens tokens (greedy): "free" ones (no
constraint, ignore_eos) and "json_schema" ones (`response_format` with LONG_SCHEMA: a list of at least
`_MIN_WORDS` short strings, so the grammar cannot end before --tokens and both arms generate as many tokens). The two
arms alternate within each repeat (A/B, then B/A), --repeats times; each figure is the median over the repeats of
the level's median gap between streamed tokens (ITL p50). Compile time: a request with a never-seen schema (its
grammar compiled on the way) against the same schema again (cached) and against no schema, 1 token each.

    python -m bench.structured_output [--engine onnx_int4] [--levels 1 32] [--tokens 64] [--repeats 3]

Output: bench/results/<date>-structured-output.{json,md} (--out to change), with the machine's load (uptime) before
and after: the figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import statistics
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.load import StreamTimer, run_level
from bench.suite import engine_env, fastest_dtype, requests_per_level, reserve_prompts
from bench.targets import fastapi_door, free_port
from bench.workloads import WORDS

log = logging.getLogger("bench.structured_output")
RESULTS = Path(__file__).parent / "results"
MODEL = "SmolLM2-135M-Instruct"
_MIN_WORDS = 200  # more items than --tokens can write: the constrained answer always runs to max_tokens
LONG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "words": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": _MIN_WORDS},
    },
    "required": ["words"],
}
ARMS = ("free", "json_schema")


def prompt(i: int) -> str:
    """Request i's question: distinct words up front, so no request reuses another's prefix cache."""
    words = " ".join(WORDS[(7 * i + k) % len(WORDS)] for k in range(3))
    return f"{words}: list short words about these topics as JSON."


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "words", "schema": schema, "strict": True}}


class Client:
    """Streams chat completions from the door, with or without the constraint."""

    def __init__(self, url: str, tokens: int) -> None:
        limits = httpx.Limits(max_connections=256, keepalive_expiry=1.0)
        self.http = httpx.AsyncClient(base_url=url, timeout=600, limits=limits)
        self.tokens = tokens

    def body(self, i: int, schema: dict[str, Any] | None, tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": tokens,
            "temperature": 0.0,
            "ignore_eos": True,  # exactly `tokens` tokens free; the schema cannot end sooner (_MIN_WORDS)
        }
        if schema is not None:
            body["response_format"] = response_format(schema)
        return body

    async def stream(self, i: int, schema: dict[str, Any] | None) -> Any:
        """One streamed request; its timer (gaps between content events, completion tokens)."""
        body = {**self.body(i, schema, self.tokens), "stream": True, "stream_options": {"include_usage": True}}
        timer = StreamTimer()
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("usage"):
                    timer.tokens = event["usage"]["completion_tokens"]
                if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                    timer.token()
        if timer.tokens != self.tokens:
            raise RuntimeError(f"expected {self.tokens} tokens, got {timer.tokens}")
        return timer.sample()

    async def once(self, i: int, schema: dict[str, Any] | None) -> float:
        """Seconds for one non-streamed 1-token request."""
        started = time.perf_counter()
        resp = await self.http.post("/v1/chat/completions", json=self.body(i, schema, 1))
        resp.raise_for_status()
        return time.perf_counter() - started

    async def close(self) -> None:
        await self.http.aclose()


async def compile_times(client: Client, samples: int) -> dict[str, float]:
    """Median milliseconds of a 1-token request: with a never-seen schema (compiled on the way), with that schema
    again (cached), without a schema; `samples` fresh schemas (a new title makes a new schema text)."""
    first, cached, free = [], [], []
    for n in range(samples):
        schema = {**LONG_SCHEMA, "title": uuid.uuid4().hex}
        first.append(await client.once(10_000 + n, schema))
        cached.append(await client.once(10_000 + n, schema))
        free.append(await client.once(10_000 + n, None))
    ms = lambda values: round(1000 * statistics.median(values), 2)  # noqa: E731
    out = {"request_new_schema_ms": ms(first), "request_cached_schema_ms": ms(cached), "request_no_schema_ms": ms(free)}
    out["compile_first_ms"] = round(out["request_new_schema_ms"] - out["request_no_schema_ms"], 2)
    out["compile_cached_ms"] = round(out["request_cached_schema_ms"] - out["request_no_schema_ms"], 2)
    return out


async def measure(url: str, levels: Sequence[int], tokens: int, repeats: int, per_level: int) -> dict[str, Any]:
    client = Client(url, tokens)
    numbers = iter(range(1_000_000))
    try:
        started = time.perf_counter()
        await client.once(next(numbers), {**LONG_SCHEMA, "title": "warm-up"})  # builds the engine's grammar cache
        first_constrained_s = time.perf_counter() - started
        await client.stream(next(numbers), LONG_SCHEMA)  # warm: LONG_SCHEMA is cached from here on
        await client.stream(next(numbers), None)
        compile_ = await compile_times(client, samples=5)
        runs: dict[int, dict[str, list[dict[str, float]]]] = {c: {arm: [] for arm in ARMS} for c in levels}
        for rep in range(repeats):
            for c in levels:
                order = ARMS if rep % 2 == 0 else ARMS[::-1]  # interleaved: neither arm always goes first
                count = requests_per_level(per_level, c, minimum=4)
                base = reserve_prompts(numbers, count)
                for arm in order:
                    schema = LONG_SCHEMA if arm == "json_schema" else None
                    # Both arms send the same prompts (request numbers base..base+count).
                    result = await run_level(lambda i, s=schema, b=base: client.stream(b + i, s), c, count)
                    if result.errors:
                        raise RuntimeError(f"{result.errors} failed requests at concurrency {c} ({arm})")
                    runs[c][arm].append({"itl_p50_ms": result.itl_p50_ms, "tok_per_s": result.tok_per_s})
                    log.info("repeat %d c=%-3d %-11s itl p50 %7.2f ms  %7.1f tok/s", rep + 1, c, arm,
                             result.itl_p50_ms, result.tok_per_s)  # fmt: skip
    finally:
        await client.close()
    return {"first_constrained_request_s": round(first_constrained_s, 3), **compile_, "levels": level_rows(runs)}


def level_rows(runs: dict[int, dict[str, list[dict[str, float]]]]) -> list[dict[str, Any]]:
    """Per level: each arm's median over the repeats, the ITL overhead of the constraint from those medians, and
    the overhead of each repeat's back-to-back pair (its spread shows what the machine's load did)."""
    rows = []
    for c, arms in runs.items():
        row: dict[str, Any] = {"concurrency": c, "repeats": len(arms["free"])}
        for arm in ARMS:
            for key in ("itl_p50_ms", "tok_per_s"):
                row[f"{key}_{arm}"] = round(statistics.median(r[key] for r in arms[arm]), 2)
        row["itl_overhead_pct"] = round(100 * (row["itl_p50_ms_json_schema"] / row["itl_p50_ms_free"] - 1), 1)
        paired = zip(arms["free"], arms["json_schema"], strict=True)
        row["itl_overhead_pct_per_repeat"] = [
            round(100 * (j["itl_p50_ms"] / f["itl_p50_ms"] - 1), 1) for f, j in paired
        ]
        rows.append(row)
    return rows


def _uptime() -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} CPUs"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Structured output: ITL with a JSON-schema constraint vs without ({result['date']})",
        "",
        f"Door: FastAPI `/v1/chat/completions` (`dsa-agent serve`, its own process), engine `{result['engine']}`, "
        f"model {MODEL}; client: this benchmark's process, streaming. {result['tokens']} tokens per request, greedy, "
        f"both arms the same prompts and token counts; arms interleaved (A/B then B/A), medians over "
        f"{result['repeats']} repeats. Machine: {result['machine']}; load before: {result['load_before']}; after: "
        f"{result['load_after']}.",
        "",
        "| concurrency | ITL p50 free (ms) | ITL p50 json_schema (ms) | overhead | per repeat | tok/s free "
        "| tok/s json |",
        "|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in result["levels"]:
        lines.append(
            f"| {row['concurrency']} | {row['itl_p50_ms_free']} | {row['itl_p50_ms_json_schema']} | "
            f"{row['itl_overhead_pct']:+.1f} % | {', '.join(f'{p:+.1f}' for p in row['itl_overhead_pct_per_repeat'])} "
            f"| {row['tok_per_s_free']} | {row['tok_per_s_json_schema']} |"
        )
    lines += [
        "",
        "Schema compile time, through the door (1-token requests, medians of 5 fresh schemas): "
        f"new schema {result['request_new_schema_ms']} ms, same schema again (cached) "
        f"{result['request_cached_schema_ms']} ms, no schema {result['request_no_schema_ms']} ms, so compiling costs "
        f"about {result['compile_first_ms']} ms the first time and {result['compile_cached_ms']} ms cached. "
        f"The first constrained request after start also loads the tokenizer's vocabulary into the grammar engine: "
        f"{result['first_constrained_request_s']} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="onnx_int4", help="an engine of bench.suite.ENGINES (not vllm)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-level", type=int, default=1, help="requests per client at each level (at least 4)")
    parser.add_argument("--out", type=Path, default=None, help="results path without suffix")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    date = dt.date.today().isoformat()
    out = args.out or RESULTS / f"{date}-structured-output"
    port = free_port()
    load_before = _uptime()
    env = {**engine_env(args.engine, fastest_dtype()), "MAX_BATCH_SIZE": str(max(args.levels))}
    with fastapi_door(port, env, out.parent / f"{out.name}-logs" / "server.log"):  # *-logs/ is git-ignored
        figures = asyncio.run(
            measure(f"http://127.0.0.1:{port}", args.levels, args.tokens, args.repeats, args.per_level)
        )
    result = {
        "date": date,
        "engine": args.engine,
        "door": "fastapi",
        "tokens": args.tokens,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_before": load_before,
        "load_after": _uptime(),
        "schema": LONG_SCHEMA,
        **figures,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
