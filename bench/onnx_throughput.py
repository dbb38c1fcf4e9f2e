"""Throughput of the ONNX engine's generate() in-process, against a static og.Generator batch on the same model.

Every request generates exactly --tokens tokens (greedy, ignore_eos) from a short chat prompt. Per concurrency level:
- engine: `concurrency` closed-loop clients, each sending --rounds requests one after another through
  `OnnxEngine.generate` (so arrivals are staggered after the first round, as in a real server); aggregate tok/s =
  completion tokens / wall time, plus time to first token p50;
- static: one `og.Generator` over a fixed batch of the same size (the figures in docs/environment.md were taken so).
Each level is repeated --repeats times and the median is printed; `os.getloadavg()` is recorded because the machine
may be shared.

    python -m bench.onnx_throughput --precision int4 --levels 1 8 32 --tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agent.config import Quantization, load_settings
from agent.engine.checkpoints import resolve_model
from agent.engine.onnx.engine import OnnxEngine
from agent.engine.spec import EngineSpec
from agent.engine.types import GenerationRequest, Message, SamplingParams

log = logging.getLogger("bench.onnx_throughput")
QUESTIONS = ["What is a binary tree?", "Explain quicksort.", "What is a hash table?", "What is recursion?"]
QUANTIZATION = {"int4": Quantization.int4, "int8": Quantization.int8, "fp32": Quantization.none}


@dataclass
class Level:
    concurrency: int
    engine_tok_s: float
    static_tok_s: float
    ttft_p50_s: float
    mean_batch: float
    runs: list[float] = field(default_factory=list)


def _request(i: int, tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message.text("user", QUESTIONS[i % len(QUESTIONS)]),),
        sampling=SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True),
    )


async def engine_run(engine: OnnxEngine, concurrency: int, tokens: int, rounds: int) -> tuple[float, list[float]]:
    """Aggregate tok/s of `concurrency` closed-loop clients, and every request's time to first token."""
    ttfts: list[float] = []

    async def client(c: int) -> int:
        total = 0
        for r in range(rounds):
            sent, first = time.perf_counter(), None
            async for chunk in engine.generate(_request(c + r, tokens)):
                if first is None:
                    first = time.perf_counter() - sent
                if chunk.finished:
                    total += chunk.completion_tokens
            ttfts.append(first if first is not None else float("nan"))
        return total

    started = time.perf_counter()
    generated = sum(await asyncio.gather(*(client(c) for c in range(concurrency))))
    return generated / (time.perf_counter() - started), ttfts


@functools.cache
def _og_model(path: str, threads: int):
    import onnxruntime_genai as og

    config = og.Config(path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og, og.Model(config)


def static_run(engine: OnnxEngine, batch: int, tokens: int) -> float:
    """tok/s of one og.Generator over `batch` prompts (no scheduler) on the engine's built model, same threads."""
    loaded = engine._loaded
    assert loaded is not None
    from agent.engine.prompt import render_prompt

    og, model = _og_model(str(loaded.onnx_path), engine.threads)
    rows = [
        loaded.tokenizer.encode(render_prompt(loaded.tokenizer, _request(i, tokens).messages, vision=False))
        for i in range(batch)
    ]
    ids = np.full((batch, max(map(len, rows))), loaded.tokenizer.pad_token_id or 0, dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    params = og.GeneratorParams(model)
    length = ids.shape[1] + tokens
    params.set_search_options(do_sample=False, batch_size=batch, max_length=length, min_length=length)
    started = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return batch * steps / (time.perf_counter() - started)


async def measure(args: argparse.Namespace) -> dict:
    settings = load_settings()
    folder = resolve_model(settings.model_path, settings.model_cache_dir).folder
    spec = EngineSpec(
        folder=folder,
        name=folder.name,
        quantization=QUANTIZATION[args.precision],
        max_batch_size=max(args.levels),
        cache_dir=settings.model_cache_dir,
    )
    engine = OnnxEngine(spec, accuracy_level=args.accuracy_level, threads=args.threads)
    started = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - started
    levels: list[Level] = []
    try:
        await engine.complete(_request(0, 8))  # warm-up
        for concurrency in args.levels:
            runs, statics, ttfts, batches = [], [], [], []
            for _ in range(args.repeats):
                steps0, sum0 = engine.stats.steps, engine.stats.batch_size_sum
                tok_s, ttft = await engine_run(engine, concurrency, args.tokens, args.rounds)
                steps = engine.stats.steps - steps0
                batches.append((engine.stats.batch_size_sum - sum0) / max(steps, 1))
                runs.append(tok_s)
                ttfts += ttft
                statics.append(await asyncio.to_thread(static_run, engine, concurrency, args.tokens))
            level = Level(
                concurrency,
                statistics.median(runs),
                statistics.median(statics),
                statistics.median(ttfts) if ttfts else float("nan"),
                statistics.mean(batches),
                runs,
            )
            log.info("%s", level)
            levels.append(level)
    finally:
        await engine.shutdown()
    return {
        "precision": args.precision,
        "accuracy_level": args.accuracy_level,
        "threads": engine.threads,
        "tokens": args.tokens,
        "load_s": round(load_s, 2),
        "loadavg": os.getloadavg(),
        "levels": [asdict(level) for level in levels],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=sorted(QUANTIZATION), default="int4")
    parser.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy level (builder)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: usable cores)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = asyncio.run(measure(args))
    print(f"ONNX {result['precision']} ({result['threads']} threads, load {result['loadavg'][0]:.1f}):")
    print(f"{'conc':>5} {'engine tok/s':>13} {'static tok/s':>13} {'ratio':>6} {'TTFT p50':>9} {'mean batch':>10}")
    for lv in result["levels"]:
        ratio = lv["engine_tok_s"] / lv["static_tok_s"]
        print(
            f"{lv['concurrency']:>5} {lv['engine_tok_s']:>13.1f} {lv['static_tok_s']:>13.1f} {ratio:>6.2f} "
            f"{lv['ttft_p50_s']:>8.3f}s {lv['mean_batch']:>10.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
