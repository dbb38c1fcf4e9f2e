"""`make bench` / `dsa-agent bench`: every engine through its doors, against llama.cpp's llama-server and
`vllm serve` on the same model, and against the machine's floor, in one run (bench/suite.py has the targets).

Every request generates exactly --tokens tokens (ignore_eos, greedy), streamed; the workloads are in
bench/workloads.py (random distinct prompts; a tutor conversation). For each target and concurrency level the sweep
runs --repeats times and the median of each figure is reported; ratios are taken within this run only. The engines
alone, in this process, are a separate reference table (--inprocess). Output: bench/results/<date>-<machine>.{json,md,
png}; `python -m bench.readme` then rewrites README.md's performance section from the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import logging
import platform
from pathlib import Path

from bench import floor, report, suite
from bench.load import InProcessEngine
from bench.workloads import Workload, random_workload, tutor_workload

log = logging.getLogger("bench")
RESULTS = Path(__file__).parent / "results"
INPROCESS = ["onnx_int4", "onnx_int8", "transformers_batched", "transformers_unbatched"]
WORKLOADS = ["random", "tutor"]


def _workloads(args: argparse.Namespace, folder: Path) -> list[Workload]:
    """The asked workloads; random prompts are sized with the model's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    made = {"random": lambda: random_workload(args.prompt_tokens, args.seed, count), "tutor": tutor_workload}
    return [made[name]() for name in args.workloads]


def run_targets(args: argparse.Namespace, folder: Path, name: str, logs: Path, settings: dict) -> suite.Figures:
    """The doors over each engine, then the peers; one server at a time. A server that fails is listed in
    settings["failures"] and the run goes on."""
    plan = suite.Plan(args.levels, args.repeats, args.per_level, args.tokens, args.workload_list, args.min_requests)
    figures: suite.Figures = {}
    failures: list[str] = settings.setdefault("failures", [])
    for engine in args.engines:
        if args.doors:
            log.info("engine %s through %s", engine, ", ".join(args.doors))
            suite.merge(figures, suite.run_doors(engine, args.doors, plan, name, settings["dtype"], logs, failures))
    if "vllm_serve" in args.peers:
        log.info("peer: vllm serve (--dtype %s)", settings["dtype"])
        try:
            suite.merge(figures, suite.run_vllm_serve(plan, folder, name, settings["dtype"], logs, failures))
        except (RuntimeError, TimeoutError) as exc:  # it did not start
            failures.append(f"vllm_serve: {exc}")
    if "llama_server" in args.peers:
        from agent.engine.checkpoints import embedded_gguf

        log.info("peer: llama-server (%s)", args.llama_binary)
        try:
            suite.merge(figures, suite.run_llama_server(plan, args.llama_binary, embedded_gguf(), logs))
        except (RuntimeError, TimeoutError) as exc:
            failures.append(f"llama_server: {exc}")
    return figures


def run_inprocess(args: argparse.Namespace, folder: Path, name: str) -> suite.Figures:
    """The engines alone in this process (no door, no client process): the labelled reference table."""
    figures: suite.Figures = {}
    for workload in args.workload_list:
        for key in args.inprocess:
            log.info("in-process reference: %s, workload %s", key, workload.name)
            if key.startswith("transformers"):
                rows = asyncio.run(_transformers_sweep(folder, name, key == "transformers_batched", args, workload))
            else:
                rows = asyncio.run(_onnx_sweep(folder, name, key.removeprefix("onnx_"), args, workload))
            figures.setdefault(workload.name, {})[f"inprocess/{key}"] = rows
    return figures


def _plan(args: argparse.Namespace, levels: list[int], per_level: int) -> suite.Plan:
    return suite.Plan(levels, args.repeats, per_level, args.tokens, args.workload_list, args.min_requests)


async def _transformers_sweep(
    folder: Path, name: str, batched: bool, args: argparse.Namespace, workload: Workload
) -> list[dict]:
    """The engine alone, batching on (max_batch_size 32) or off (1: the seed's one-request-at-a-time design).

    Only the lowest and highest levels, one request per client: unbatched, 32 clients already take minutes."""
    from agent.config import DType, Quantization
    from agent.engine.spec import EngineSpec
    from agent.engine.transformers.engine import TransformersEngine

    spec = EngineSpec(
        folder=folder,
        name=name,
        dtype=DType(args.dtype),
        quantization=Quantization.none,
        max_batch_size=32 if batched else 1,
    )
    engine = TransformersEngine(spec)
    await engine.start()
    try:
        levels = sorted({min(args.levels), max(args.levels)})
        client = lambda: InProcessEngine(engine, args.tokens, workload)  # noqa: E731
        return await suite.sweep(client, _plan(args, levels, 1), levels, itertools.count())
    finally:
        await engine.shutdown()


async def _onnx_sweep(
    folder: Path, name: str, quantization: str, args: argparse.Namespace, workload: Workload
) -> list[dict]:
    """The ONNX Runtime GenAI engine alone, in-process: int4 (what `auto` serves for the seed's default
    QUANTIZATION_TYPE=int4 on CPU) or int8."""
    from agent.config import Quantization
    from agent.engine.onnx.engine import OnnxEngine
    from agent.engine.spec import EngineSpec

    spec = EngineSpec(folder=folder, name=name, quantization=Quantization(quantization), max_batch_size=32)
    engine = OnnxEngine(spec)
    await engine.start()
    try:
        client = lambda: InProcessEngine(engine, args.tokens, workload)  # noqa: E731
        return await suite.sweep(client, _plan(args, args.levels, args.per_level), args.levels, itertools.count())
    finally:
        await engine.shutdown()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    engines = suite.available_engines()
    parser = argparse.ArgumentParser(prog="dsa-agent bench", description=__doc__)
    parser.add_argument("--engines", nargs="*", default=engines, choices=suite.ENGINES, help="behind every door")
    parser.add_argument("--doors", nargs="*", default=list(suite.DOORS), choices=suite.DOORS)
    parser.add_argument("--peers", nargs="*", default=list(suite.PEERS), choices=suite.PEERS)
    parser.add_argument("--inprocess", nargs="*", default=INPROCESS, choices=INPROCESS, help="reference table")
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    parser.add_argument("--no-images", dest="images", action="store_false", help="skip the image workload")
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated by every request")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="length of the random workload's prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random workload's prompts")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per target; medians are reported")
    parser.add_argument("--per-level", type=int, default=2, help="requests per client at each level")
    parser.add_argument(
        "--min-requests", type=int, default=12, help="requests per level at least (4 at concurrency 1 was too noisy)"
    )
    parser.add_argument("--quick", action="store_true", help="levels 1 and 32, one repeat (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="suffix for the result files (a partial run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.repeats = [1, 32], 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the figures

    from agent.config import load_settings
    from agent.engine.checkpoints import parameter_count, resolve_model

    args.model_cache_dir = load_settings().model_cache_dir
    resolved = resolve_model(None, args.model_cache_dir)
    args.dtype = suite.fastest_dtype()
    args.workload_list = _workloads(args, resolved.folder)
    stamp = f"{dt.date.today().isoformat()}-{platform.node() or 'machine'}" + (f"-{args.label}" if args.label else "")
    logs = args.out / f"{stamp}-logs"
    settings: dict = {"dtype": args.dtype, "shipped": f"gateway/{suite.shipped_engine()}"}
    if "llama_server" in args.peers:  # built first (once, ~15 min on 2 cores), never in the middle of the figures
        from bench.peers import llama_server

        args.llama_binary = llama_server.ensure_built(args.model_cache_dir)
        settings["llama_server"] = llama_server.build_info(args.model_cache_dir)  # flags, source, no machine path
    log.info("measuring the machine's floor")
    machine = floor.measure_machine()
    params = parameter_count(resolved.folder)  # the loader's own count (safetensors headers)
    if params is None:
        raise SystemExit(f"cannot count the parameters of {resolved.folder} (no readable safetensors file)")
    figures = run_targets(args, resolved.folder, resolved.name, logs, settings)
    inprocess = run_inprocess(args, resolved.folder, resolved.name)
    images = report.image_workload(args) if args.images else []
    result = report.assemble(machine, params, figures, inprocess, images, args, settings)
    paths = report.write(result, args.out, stamp)
    print(report.markdown(result))
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
