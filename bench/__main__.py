"""`make bench` / `dsa-agent bench`: each door against `vllm serve` and against the machine's floor, in one run.

Every request generates exactly --tokens tokens (ignore_eos, greedy), streamed. For each target and concurrency level
the sweep runs --repeats times and the median of each figure is reported; ratios are taken within this run only.
Output: bench/results/<date>-<machine>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

from bench import floor, report
from bench.load import InProcessEngine, LevelResult, OpenAIStream, TritonGrpcStream, TritonHttpStream, run_level
from bench.targets import fastapi_door, free_port, triton_door, vllm_serve

log = logging.getLogger("bench")
RESULTS = Path(__file__).parent / "results"
ALL_TARGETS = [
    "vllm_serve",
    "fastapi",
    "triton",
    "onnx",
    "onnx_int8",
    "onnx_fp32",
    "transformers_batched",
    "transformers_unbatched",
    "images",
]


def _median_levels(runs: list[list[LevelResult]]) -> list[dict]:
    """Per concurrency level, the median of each figure over the repeats."""
    out = []
    for level_runs in zip(*runs, strict=True):
        row = {"concurrency": level_runs[0].concurrency, "repeats": len(level_runs)}
        for key, value in level_runs[0].as_dict().items():
            if key != "concurrency" and isinstance(value, int | float):
                row[key] = statistics.median(getattr(r, key) for r in level_runs)
        out.append(row)
    return out


async def _sweep(make_client: Callable[[], object], levels: list[int], repeats: int, per_level: int) -> list[dict]:
    runs: list[list[LevelResult]] = []
    for rep in range(repeats):
        client = make_client()
        await client(0)  # warm-up request, not counted
        results = []
        for c in levels:
            result = await run_level(client, c, max(per_level * c, 4))
            log.info(
                "  repeat %d  c=%-3d %8.1f tok/s  ttft p50 %7.1f ms", rep + 1, c, result.tok_per_s, result.ttft_p50_ms
            )
            results.append(result)
        await client.close()
        runs.append(results)
    return _median_levels(runs)


def _engine_env(strategy: str) -> dict[str, str]:
    return {"LOADING_STRATEGY": strategy, "QUANTIZATION_TYPE": "none", "DTYPE": "bfloat16", "MAX_BATCH_SIZE": "32"}


def run_targets(args: argparse.Namespace, folder: Path, name: str, logs: Path) -> dict[str, list[dict]]:
    figures: dict[str, list[dict]] = {}
    sweep = dict(levels=args.levels, repeats=args.repeats, per_level=args.per_level)

    if "vllm_serve" in args.targets:
        port = free_port()
        log.info("vllm serve (reference)")
        with vllm_serve(folder, name, port, eager=True, log_path=logs / "vllm_serve.log"):
            url = f"http://127.0.0.1:{port}"
            figures["vllm_serve"] = asyncio.run(_sweep(lambda: OpenAIStream(url, name, args.tokens), **sweep))
    if "fastapi" in args.targets:
        port = free_port()
        log.info("FastAPI door (vLLM engine in-process)")
        with fastapi_door(port, _engine_env("vllm"), logs / "fastapi.log"):
            url = f"http://127.0.0.1:{port}"
            figures["fastapi"] = asyncio.run(_sweep(lambda: OpenAIStream(url, name, args.tokens), **sweep))
    if "triton" in args.targets:
        http, grpc, metrics = free_port(), free_port(), free_port()
        log.info("Triton door (vLLM engine in the python backend)")
        with triton_door(http, grpc, metrics, _engine_env("vllm"), logs / "triton.log"):
            model = "qwen3-vl"
            grpc_url, http_url = f"127.0.0.1:{grpc}", f"127.0.0.1:{http}"
            figures["triton_grpc"] = asyncio.run(
                _sweep(lambda: TritonGrpcStream(grpc_url, model, args.tokens), **sweep)
            )
            figures["triton_http"] = asyncio.run(
                _sweep(lambda: TritonHttpStream(http_url, model, args.tokens), **sweep)
            )
    for batched in (True, False):
        key = "transformers_batched" if batched else "transformers_unbatched"
        if key in args.targets:
            log.info("transformers engine in-process, batching %s", "on" if batched else "off (the seed's design)")
            figures[key] = asyncio.run(_transformers_sweep(folder, name, batched, args))
    for key, quantization in (("onnx", "int4"), ("onnx_int8", "int8"), ("onnx_fp32", "none")):
        if key in args.targets:
            log.info("ONNX Runtime GenAI engine in-process (%s)", quantization)
            figures[key] = asyncio.run(_onnx_sweep(folder, name, quantization, args))
    return figures


async def _transformers_sweep(folder: Path, name: str, batched: bool, args: argparse.Namespace) -> list[dict]:
    """The engine alone, batching on (max_batch_size 32) or off (1: the seed's one-request-at-a-time design).

    Only the lowest and highest levels, one request per client: unbatched, 32 clients already take minutes."""
    from agent.config import DType, Quantization
    from agent.engine.spec import EngineSpec
    from agent.engine.transformers.engine import TransformersEngine

    spec = EngineSpec(
        folder=folder,
        name=name,
        dtype=DType.bfloat16,
        quantization=Quantization.none,
        max_batch_size=32 if batched else 1,
    )
    engine = TransformersEngine(spec)
    await engine.start()
    try:
        levels = sorted({min(args.levels), max(args.levels)})
        return await _sweep(lambda: InProcessEngine(engine, args.tokens), levels, args.repeats, 1)
    finally:
        await engine.shutdown()


async def _onnx_sweep(folder: Path, name: str, quantization: str, args: argparse.Namespace) -> list[dict]:
    """The ONNX Runtime GenAI engine alone, in-process: int4 (what `auto` serves for the seed's default
    QUANTIZATION_TYPE=int4 on CPU), int8, or fp32 (QUANTIZATION_TYPE=none)."""
    from agent.config import Quantization
    from agent.engine.onnx.engine import OnnxEngine
    from agent.engine.spec import EngineSpec

    spec = EngineSpec(folder=folder, name=name, quantization=Quantization(quantization), max_batch_size=32)
    engine = OnnxEngine(spec)
    await engine.start()
    try:
        return await _sweep(lambda: InProcessEngine(engine, args.tokens), args.levels, args.repeats, args.per_level)
    finally:
        await engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsa-agent bench", description=__doc__)
    parser.add_argument("--targets", nargs="+", default=ALL_TARGETS, choices=ALL_TARGETS)
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated by every request")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per target; medians are reported")
    parser.add_argument("--per-level", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--quick", action="store_true", help="levels 1 8 32, one repeat (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="suffix for the result files (a partial run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.repeats = [1, 8, 32], 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the figures

    from agent.config import load_settings
    from agent.engine.checkpoints import resolve_model

    resolved = resolve_model(None, load_settings().model_cache_dir)
    stamp = f"{dt.date.today().isoformat()}-{platform.node() or 'machine'}" + (f"-{args.label}" if args.label else "")
    logs = args.out / f"{stamp}-logs"
    log.info("measuring the machine's floor")
    machine = floor.measure_machine()
    params = floor.count_params(str(resolved.folder))
    figures = run_targets(args, resolved.folder, resolved.name, logs)
    images = report.image_workload(args) if "images" in args.targets else []
    result = report.assemble(machine, params, figures, images, args)
    paths = report.write(result, args.out, stamp)
    print(report.markdown(result))
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
