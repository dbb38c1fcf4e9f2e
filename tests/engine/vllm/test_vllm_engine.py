"""vLLM-specific behaviour of VllmEngine: settings -> vLLM arguments, refusals on CPU, prompts, stats, shutdown.

The shared contract (streaming, abort, batching, ...) runs against vLLM through tests/engine/test_contract.py, on the
session engine `vllm_smollm_engine` (tests/engine/conftest.py) that the slow tests here reuse.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest

from agent.config import Attention, DType, Quantization
from agent.engine.errors import InvalidRequestError, ModelLoadError, NotReadyError
from agent.engine.prompt import render_prompt
from agent.engine.spec import EngineSpec
from agent.engine.types import GenerationRequest, Message, SamplingParams
from agent.engine.vllm.engine import (
    DEFAULT_CPU_KV_CACHE_GIB,
    VllmEngine,
    _engine_processes,
    attention_backend_arg,
    dtype_arg,
    engine_kwargs,
    finish_reason,
    quantization_arg,
)


def ask(text: str, **sampling: object) -> GenerationRequest:
    params = {"temperature": 0.0, "max_new_tokens": 8, **sampling}
    return GenerationRequest(messages=(Message.text("user", text),), sampling=SamplingParams(**params))


def vllm_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::")]


def new_vllm_children(before: set[int]) -> list[psutil.Process]:
    """vLLM processes started since `before` (the session's shared engines may already run their own)."""
    return [p for p in vllm_children() if p.pid not in before]


# --- settings -> vLLM arguments (pure) ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_quantization_passes_through_what_vllm_checks(device: str) -> None:
    assert quantization_arg(Quantization.none, device, []) is None
    assert quantization_arg(Quantization.awq, device, []) == "awq"
    assert quantization_arg(Quantization.gptq, device, []) == "gptq"


@pytest.mark.parametrize("quantization", [Quantization.int4, Quantization.int8])
def test_quantize_on_load_is_refused_on_cpu(quantization: Quantization) -> None:
    with pytest.raises(ModelLoadError, match="vLLM on CPU cannot quantize on load") as err:
        quantization_arg(quantization, "cpu", ["bitsandbytes"])
    assert "QUANTIZATION_TYPE=none" in err.value.message
    assert "LOADING_STRATEGY=transformers" in err.value.message


def test_int4_on_cuda_needs_bitsandbytes_in_vllm() -> None:
    assert quantization_arg(Quantization.int4, "cuda", ["awq", "bitsandbytes"]) == "bitsandbytes"
    with pytest.raises(ModelLoadError, match="no on-load bitsandbytes.*LOADING_STRATEGY=transformers"):
        quantization_arg(Quantization.int4, "cuda", ["awq", "gptq"])


def test_int8_on_cuda_points_to_transformers() -> None:
    with pytest.raises(ModelLoadError, match="4 bits only.*LOADING_STRATEGY=transformers"):
        quantization_arg(Quantization.int8, "cuda", ["bitsandbytes"])


def test_attention_mapping() -> None:
    for device in ("cpu", "cuda"):
        assert attention_backend_arg(Attention.sdpa, device) is None
        assert attention_backend_arg(Attention.eager, device) is None
    assert attention_backend_arg(Attention.flash_attention_2, "cuda") == "FLASH_ATTN"
    with pytest.raises(ModelLoadError, match="flash_attention_2 needs CUDA.*ATTENTION_IMPL=sdpa"):
        attention_backend_arg(Attention.flash_attention_2, "cpu")


def test_dtype_mapping() -> None:
    assert dtype_arg(DType.auto, "cpu") == "bfloat16"
    assert dtype_arg(DType.auto, "cuda") == "auto"
    assert dtype_arg(DType.float32, "cpu") == "float32"


def test_engine_kwargs_from_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    spec = EngineSpec(
        folder=tmp_path,
        name="m",
        quantization=Quantization.none,
        max_batch_size=12,
        vllm_max_model_len=2048,
        vllm_enforce_eager=True,
        image_min_pixels=1024,
        image_max_pixels=65536,
    )
    kwargs = engine_kwargs(spec, quantization_methods=[])
    assert kwargs["model"] == str(tmp_path) and kwargs["served_model_name"] == "m"
    assert kwargs["dtype"] == "bfloat16" and kwargs["quantization"] is None
    assert (kwargs["max_num_seqs"], kwargs["max_model_len"], kwargs["enforce_eager"]) == (12, 2048, True)
    assert kwargs["mm_processor_kwargs"] == {"size": {"shortest_edge": 1024, "longest_edge": 65536}}
    assert "attention_backend" not in kwargs
    # Unset, vLLM would try to reserve 90 % of RAM: a bounded default instead.
    assert kwargs["kv_cache_memory_bytes"] == DEFAULT_CPU_KV_CACHE_GIB * 1024**3
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert "kv_cache_memory_bytes" not in engine_kwargs(spec, quantization_methods=[])  # vLLM reads the user's value


def test_finish_reasons() -> None:
    assert [finish_reason(r) for r in ("stop", "length", "abort", None)] == ["stop", "length", "abort", None]
    assert finish_reason("error") == "error"


# --- refusals at start, before any vLLM process is started -------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"quantization": Quantization.int4}, "QUANTIZATION_TYPE=int4: vLLM on CPU cannot quantize"),
        ({"quantization": Quantization.int8}, "QUANTIZATION_TYPE=int8: vLLM on CPU cannot quantize"),
        ({"attention": Attention.flash_attention_2}, "ATTENTION_IMPL=flash_attention_2 needs CUDA"),
    ],
)
async def test_start_refuses_impossible_cpu_settings(smollm_spec: EngineSpec, changes: dict, match: str) -> None:
    before = {p.pid for p in vllm_children()}
    engine = VllmEngine(smollm_spec.with_(**changes))
    with pytest.raises(ModelLoadError, match=match) as err:
        await engine.start()
    assert err.value.status == 422
    assert engine._llm is None and not new_vllm_children(before)


async def test_vision_model_on_cpu_names_the_transformers_engine(tiny_vl_folder: Path) -> None:
    before = {p.pid for p in vllm_children()}
    engine = VllmEngine(EngineSpec(folder=tiny_vl_folder, name="tiny-qwen3-vl", quantization=Quantization.none))
    with pytest.raises(ModelLoadError, match="vision model.*LOADING_STRATEGY=transformers"):
        await engine.start()
    assert not new_vllm_children(before)


async def test_generate_before_start_is_not_ready(smollm_spec: EngineSpec) -> None:
    engine = VllmEngine(smollm_spec)
    with pytest.raises(NotReadyError):
        await anext(engine.generate(ask("hi")))
    await engine.abort("nothing")  # no-ops before start
    await engine.shutdown()


# --- on the session engine (SmolLM2, fp32, enforce_eager) --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.vllm
async def test_prompt_is_the_shared_rendering(vllm_smollm_engine: VllmEngine, smollm_folder: Path) -> None:
    """vLLM sees exactly the tokens the transformers engine would: render_prompt + no extra special tokens."""
    from transformers import AutoTokenizer

    messages = (
        Message.text("system", "You are a tutor."),
        Message.text("user", "What is a heap?"),
        Message.text("assistant", "A tree with an order property."),
        Message.text("user", "And a stack?"),
    )
    tokenizer = AutoTokenizer.from_pretrained(smollm_folder)
    expected = tokenizer(render_prompt(tokenizer, messages, vision=False), add_special_tokens=False)["input_ids"]
    result = await vllm_smollm_engine.complete(
        GenerationRequest(messages=messages, sampling=SamplingParams(max_new_tokens=2, temperature=0.0))
    )
    assert result.prompt_tokens == len(expected)


@pytest.mark.slow
@pytest.mark.vllm
async def test_stats_follow_vllm_scheduler(vllm_smollm_engine: VllmEngine) -> None:
    stats = vllm_smollm_engine.stats
    steps_before, tokens_before = stats.steps, stats.batch_size_sum
    results = await asyncio.gather(
        *(vllm_smollm_engine.complete(ask(f"Say {n}.", max_new_tokens=6, ignore_eos=True)) for n in range(4))
    )
    assert all(r.completion_tokens == 6 for r in results)
    assert stats.batch_size_sum - tokens_before == 4 * 6  # every generated token counted in exactly one step
    assert 6 <= stats.steps - steps_before < 4 * 6  # one step per token position, and requests shared steps
    assert stats.max_batch_seen >= 2
    assert (stats.running, stats.waiting) == (0, 0)


@pytest.mark.slow
@pytest.mark.vllm
async def test_abort_while_vllm_is_still_tokenizing(vllm_smollm_engine: VllmEngine) -> None:
    """An abort that reaches vLLM before the request does (a no-op there) still stops the request."""
    request = ask("Count to one hundred.", max_new_tokens=400, ignore_eos=True)
    chunks = []

    async def consume() -> None:
        async for chunk in vllm_smollm_engine.generate(request):
            chunks.append(chunk)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # the stream has started; vLLM tokenizes the prompt off the loop
    await vllm_smollm_engine.abort(request.request_id)
    await asyncio.wait_for(task, timeout=60)
    assert chunks[-1].finish_reason == "abort"
    assert chunks[-1].completion_tokens < 400


@pytest.mark.slow
@pytest.mark.vllm
async def test_prompt_longer_than_context_is_a_400(vllm_smollm_engine: VllmEngine) -> None:
    too_long = "word " * (vllm_smollm_engine.info().context_length + 10)
    with pytest.raises(InvalidRequestError, match="maximum context length") as err:
        await vllm_smollm_engine.complete(ask(too_long))
    assert err.value.status == 400
    assert vllm_smollm_engine.stats.running == 0
    assert (await vllm_smollm_engine.complete(ask("Still there?"))).text  # the engine keeps serving


@pytest.mark.slow
@pytest.mark.vllm
async def test_sampling_values_vllm_refuses_are_a_400(vllm_smollm_engine: VllmEngine) -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens must be at least 1"):
        await vllm_smollm_engine.complete(ask("hi", max_new_tokens=0))
    with pytest.raises(InvalidRequestError, match="top_p"):
        await vllm_smollm_engine.complete(ask("hi", temperature=0.5, top_p=0.0))
    assert vllm_smollm_engine.stats.running == 0


@pytest.mark.slow
@pytest.mark.vllm
async def test_bf16_start_and_shutdown_leave_no_process(smollm_spec: EngineSpec, monkeypatch) -> None:
    """DTYPE=auto serves bf16 on CPU; shutdown() ends vLLM's EngineCore and worker processes (nothing left behind)."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # the user's value is honoured (and keeps this one small)
    before = {p.pid for p in vllm_children()}
    engine = VllmEngine(smollm_spec.with_(dtype=DType.auto, max_batch_size=4))
    await engine.start()
    try:
        assert engine.info().dtype == "bfloat16"
        assert {p.pid for p in vllm_children()} - before, "no EngineCore process found while running"
        cores, workers = _engine_processes(engine._llm)  # what shutdown() waits for
        assert len(cores) == 1 and any(w.name().startswith("VLLM::Worker") for w in workers), (cores, workers)
        result = await engine.complete(ask("What is a queue?", max_new_tokens=4, ignore_eos=True))
        assert result.completion_tokens == 4 and result.text.strip()
    finally:
        await engine.shutdown()
    assert not new_vllm_children(before)
    assert not await engine.health()
