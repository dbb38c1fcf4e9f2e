"""The cross-check drives vLLM's benchmark client with the bench's settings (its own parser accepts them)."""

from __future__ import annotations

import argparse

import pytest

from bench.crosscheck import vllm_bench_args


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_bench_serve_accepts_the_random_workloads_settings() -> None:
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = argparse.Namespace(
        base_url="http://127.0.0.1:1", model="m", input_len=128, output_len=64, prompts=32, concurrency=8
    )
    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    parsed = parser.parse_args(vllm_bench_args(args, "/tok"))
    assert (parsed.random_input_len, parsed.random_output_len, parsed.max_concurrency) == (128, 64, 8)
    assert parsed.ignore_eos and parsed.dataset_name == "random" and parsed.backend == "openai-chat"
    assert (parsed.num_prompts, parsed.tokenizer, parsed.temperature) == (32, "/tok", 0.0)
