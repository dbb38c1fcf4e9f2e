"""Throughput of the transformers engine in-process, against padded `model.generate` on the same model and machine.

Every request generates exactly --tokens tokens (ignore_eos, greedy) from a short chat prompt. For each concurrency
level the engine's aggregate tok/s (completion tokens / wall time of the whole level) is printed beside left-padded
`generate` for a fixed batch of the same size (the upper bound for a non-streaming, non-continuous batcher; the
figures in docs/environment.md were taken that way).

    python -m bench.engine_throughput --dtype bfloat16 --levels 1 8 32 --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from agent.config import DType, Quantization, load_settings
from agent.engine.checkpoints import resolve_model
from agent.engine.spec import EngineSpec
from agent.engine.transformers.engine import TransformersEngine
from agent.engine.types import GenerationRequest, Message, SamplingParams

log = logging.getLogger("bench.engine_throughput")
QUESTIONS = ["What is a binary tree?", "Explain quicksort.", "What is a hash table?", "What is recursion?"]


@dataclass
class Level:
    concurrency: int
    engine_tok_s: float
    generate_tok_s: float | None
    max_batch_seen: int
    mean_batch: float


def _request(i: int, tokens: int) -> GenerationRequest:
    question = QUESTIONS[i % len(QUESTIONS)]
    return GenerationRequest(
        messages=(Message.text("user", question),),
        sampling=SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True),
    )


async def engine_level(engine: TransformersEngine, concurrency: int, tokens: int) -> tuple[float, int, float]:
    """Aggregate tok/s for `concurrency` simultaneous requests, and the batch sizes seen meanwhile."""
    steps0, sum0 = engine.stats.steps, engine.stats.batch_size_sum
    engine.stats.max_batch_seen = 0
    started = time.perf_counter()
    results = await asyncio.gather(*(engine.complete(_request(i, tokens)) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    generated = sum(r.completion_tokens for r in results)
    steps = engine.stats.steps - steps0
    mean = (engine.stats.batch_size_sum - sum0) / steps if steps else 0.0
    return generated / elapsed, engine.stats.max_batch_seen, mean


def generate_level(engine: TransformersEngine, concurrency: int, tokens: int) -> float:
    """The same work through transformers' own padded `generate` (one fixed batch, left padding)."""
    loaded = engine._loaded  # the benchmark deliberately reuses the engine's loaded model
    assert loaded is not None
    tok = loaded.tokenizer
    tok.padding_side = "left"
    prompts = [engine.prompt_for(_request(i, tokens).messages) for i in range(concurrency)]
    inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(engine.spec.device)
    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.inference_mode():
        loaded.model.generate(**inputs, **kwargs)  # warm-up over the same shapes
        started = time.perf_counter()
        out = loaded.model.generate(**inputs, **kwargs)
    elapsed = time.perf_counter() - started
    return (out.shape[1] - inputs["input_ids"].shape[1]) * concurrency / elapsed


async def run(args: argparse.Namespace) -> list[Level]:
    settings = load_settings()
    folder = Path(args.model) if args.model else resolve_model(None, settings.model_cache_dir).folder
    spec = EngineSpec(
        folder=folder,
        name=folder.name,
        device=args.device,
        dtype=DType(args.dtype),
        quantization=Quantization(args.quantization),
        max_batch_size=max(args.levels),
    )
    engine = TransformersEngine(spec)
    await engine.start()
    if args.threads:
        torch.set_num_threads(args.threads)  # after start(), which sets one thread per core
    levels = []
    try:
        for n in args.levels:
            # Warm-up over the same shapes (bf16 on CPU is slow the first time it meets a shape).
            await engine_level(engine, n, args.tokens)
            tok_s, max_batch, mean_batch = await engine_level(engine, n, args.tokens)
            gen = None if args.skip_generate else await asyncio.to_thread(generate_level, engine, n, args.tokens)
            levels.append(Level(n, round(tok_s, 1), gen and round(gen, 1), max_batch, round(mean_batch, 1)))
            log.info("%s", levels[-1])
    finally:
        await engine.shutdown()
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=[d.value for d in DType])
    parser.add_argument("--quantization", default="none", choices=[q.value for q in Quantization])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-generate", action="store_true", help="engine only (no padded-generate baseline)")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core, as the engine sets)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    levels = asyncio.run(run(args))
    print(f"{'conc':>5} {'engine tok/s':>13} {'generate tok/s':>15} {'max batch':>10} {'mean batch':>11}")
    for lv in levels:
        gen = f"{lv.generate_tok_s:.1f}" if lv.generate_tok_s is not None else "-"
        print(f"{lv.concurrency:>5} {lv.engine_tok_s:>13.1f} {gen:>15} {lv.max_batch_seen:>10} {lv.mean_batch:>11.1f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(lv) for lv in levels], indent=2))


if __name__ == "__main__":
    main()
