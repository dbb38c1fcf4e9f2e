"""Image workload, OpenVINO engine against the transformers engine, in-process, on a Qwen3-VL-2B-shaped model.

Each request carries one image (default 448x448: 784 patches through the 24-block vision tower, 196 LLM tokens) and
a short question, and streams exactly `--tokens` tokens (greedy, ignore_eos). For each engine and concurrency level:
requests/s, generated tokens/s and time to first token (p50), medians over `--repeats` rounds, engines interleaved
round by round so both see the same machine load. The model is built offline by agent.devtools.qwen3vl_shape and
exported once by the OpenVINO engine (docs/openvino.md).

Usage: `python -m bench.openvino_vision [--levels 1 4] [--quantization int8] [--engines openvino transformers]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time

log = logging.getLogger(__name__)


async def _level(engine, requests) -> dict:
    ttfts: list[float] = []

    async def one(request) -> int:
        started = time.perf_counter()
        first = None
        last = None
        async for chunk in engine.generate(request):
            if first is None:
                first = time.perf_counter() - started
            last = chunk
        ttfts.append(first or 0.0)
        return last.completion_tokens if last else 0

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(r) for r in requests)))
    wall = time.perf_counter() - started
    return {"tok_s": tokens / wall, "req_s": len(requests) / wall, "ttft_p50_ms": 1000 * statistics.median(ttfts)}


def _requests(n: int, side: int, tokens: int, salt: int) -> list:
    from PIL import Image

    from agent.engine.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart

    out = []
    for i in range(n):
        image = Image.new("RGB", (side, side), ((37 * (i + salt)) % 256, 90, 160))
        message = Message("user", (ImagePart(image), TextPart(f"What is in picture {i}?")))
        out.append(
            GenerationRequest((message,), SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True))
        )
    return out


async def run(args: argparse.Namespace) -> dict:
    from agent.config import DType, Quantization, load_settings
    from agent.devtools.qwen3vl_shape import build_qwen3vl_shape
    from agent.engine.spec import EngineSpec

    settings = load_settings()
    folder = build_qwen3vl_shape(settings.model_cache_dir / "qwen3vl-2b-shape")
    base = EngineSpec(
        folder=folder,
        name="qwen3vl-2b-shape",
        dtype=DType.float32,
        quantization=Quantization.none,
        max_batch_size=max(args.levels),
        image_max_pixels=args.side * args.side,
        cache_dir=settings.model_cache_dir,
    )
    engines = {}
    if "openvino" in args.engines:
        from agent.engine.openvino.engine import OpenVinoEngine

        engines["openvino"] = OpenVinoEngine(base.with_(quantization=Quantization(args.quantization)))
    if "transformers" in args.engines:
        from agent.engine.transformers.engine import TransformersEngine

        engines["transformers"] = TransformersEngine(base)
    for name, engine in engines.items():
        started = time.perf_counter()
        await engine.start()
        log.info("%s ready in %.1f s", name, time.perf_counter() - started)
        await _level(engine, _requests(1, args.side, 2, salt=99))  # warm-up
    rounds: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in args.levels} for name in engines}
    try:
        for repeat in range(args.repeats):
            for n in args.levels:
                for name, engine in engines.items():
                    row = await _level(engine, _requests(n, args.side, args.tokens, salt=repeat))
                    rounds[name][n].append(row)
                    log.info("%s at %d: %s", name, n, {k: round(v, 2) for k, v in row.items()})
    finally:
        for engine in engines.values():
            await engine.shutdown()
    return {
        name: {n: {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]} for n, rows in levels.items()}
        for name, levels in rounds.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--side", type=int, default=448, help="image side in pixels (also the pixel budget)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantization", default="int8", choices=("none", "int8", "int4"), help="OpenVINO weights")
    parser.add_argument("--engines", nargs="+", default=["openvino", "transformers"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = asyncio.run(run(args))
    print(json.dumps({"args": vars(args), "result": result}, indent=2))  # the benchmark's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
