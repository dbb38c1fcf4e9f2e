"""Transformers engine specifics: continuous batching, loading rules, vision (tiny Qwen3-VL), failures."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from agent.config import Attention, DType, Quantization
from agent.engine.errors import EngineFailure, InvalidRequestError, ModelLoadError
from agent.engine.prompt import render_prompt
from agent.engine.transformers.engine import TransformersEngine
from agent.engine.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart


def ask(text: str, **sampling: object) -> GenerationRequest:
    params = {"temperature": 0.0, "max_new_tokens": 8, **sampling}
    return GenerationRequest(messages=(Message.text("user", text),), sampling=SamplingParams(**params))


def look(image: Image.Image, text: str = "Describe this image.", **sampling: object) -> GenerationRequest:
    params = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True, **sampling}
    message = Message(role="user", parts=(ImagePart(image), TextPart(text)))
    return GenerationRequest(messages=(message,), sampling=SamplingParams(**params))


def noise(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# --- continuous batching ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_batched_greedy_equals_alone(smollm_engine, engine_dtype: DType) -> None:
    """Left padding, per-row positions and cache merging must not change what a sequence computes (fp32)."""
    if engine_dtype is not DType.float32:
        pytest.skip("bf16 matmuls round differently with the batch's shape (on an H100, one greedy token flipped)")
    prompts = ["Hi", "What is a binary tree? Answer in one sentence.", "Explain quicksort to a child."]
    alone = [(await smollm_engine.complete(ask(p))).text for p in prompts]
    together = await asyncio.gather(*(smollm_engine.complete(ask(p)) for p in prompts))
    assert [r.text for r in together] == alone


@pytest.mark.slow
async def test_new_request_joins_running_batch(smollm_engine) -> None:
    """A request arriving mid-generation is merged into the running batch: it neither waits for the long request
    nor changes either output."""

    def long() -> GenerationRequest:
        return ask("Count from one to fifty.", max_new_tokens=20, ignore_eos=True)

    long_alone = (await smollm_engine.complete(long())).text
    short_alone = (await smollm_engine.complete(ask("What is a hash table?", max_new_tokens=4))).text

    order: list[str] = []
    long_stream = smollm_engine.generate(long())
    long_parts = [(await anext(long_stream)).text]

    async def run_long() -> str:
        async for chunk in long_stream:
            long_parts.append(chunk.text)
        order.append("long")
        return "".join(long_parts)

    async def run_short() -> str:
        result = await smollm_engine.complete(ask("What is a hash table?", max_new_tokens=4))
        order.append("short")
        return result.text

    smollm_engine.stats.max_batch_seen = 0
    long_text, short_text = await asyncio.gather(run_long(), run_short())
    assert order == ["short", "long"]
    assert smollm_engine.stats.max_batch_seen >= 2
    assert short_text == short_alone
    assert long_text == long_alone


@pytest.mark.slow
async def test_stats_and_batch_size_history(smollm_engine) -> None:
    steps = smollm_engine.stats.steps
    requests = [ask(f"Say {n}.", max_new_tokens=4, ignore_eos=True) for n in range(4)]
    await asyncio.gather(*(smollm_engine.complete(r) for r in requests))
    assert smollm_engine.stats.steps > steps
    assert smollm_engine.stats.running == 0 and smollm_engine.stats.waiting == 0
    assert max(smollm_engine.recent_batch_sizes[-4:]) > 1


@pytest.mark.slow
async def test_failure_in_a_step_fails_only_its_requests(smollm_engine, monkeypatch) -> None:
    scheduler = smollm_engine._scheduler
    real_prefill = scheduler._prefill

    def flaky_prefill(seqs):
        if any(s.request_id.startswith("boom") for s in seqs):
            raise RuntimeError("injected fault")
        return real_prefill(seqs)

    monkeypatch.setattr(scheduler, "_prefill", flaky_prefill)
    bad = GenerationRequest(messages=(Message.text("user", "Hi"),), request_id="boom-1")
    with pytest.raises(EngineFailure) as err:
        await smollm_engine.complete(bad)
    assert err.value.status == 500 and "boom-1" in err.value.message
    assert (await smollm_engine.complete(ask("Hi", max_new_tokens=3, ignore_eos=True))).completion_tokens == 3


@pytest.mark.slow
async def test_abort_of_a_finished_id_does_not_touch_a_later_request(smollm_engine) -> None:
    await smollm_engine.abort("reused-id")  # unknown / already finished: ignored
    request = GenerationRequest(
        messages=(Message.text("user", "Hi"),),
        sampling=SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True),
        request_id="reused-id",
    )
    assert (await smollm_engine.complete(request)).finish_reason == "length"


@pytest.mark.slow
async def test_shutdown_aborts_streams_in_flight(tiny_vl_folder, engine_device: str) -> None:
    from agent.engine.spec import EngineSpec

    spec = EngineSpec(folder=tiny_vl_folder, name="tiny", dtype=DType.float32, device=engine_device)
    engine = TransformersEngine(spec)
    await engine.start()
    stream = engine.generate(look(noise(64, 64, 5), max_new_tokens=2000))
    chunks = [await anext(stream)]
    await engine.shutdown()
    chunks += [chunk async for chunk in stream]
    assert chunks[-1].finish_reason == "abort"
    assert not await engine.health()


@pytest.mark.slow
def test_prompt_is_the_shared_render(smollm_engine) -> None:
    messages = (Message.text("system", "Be brief."), Message.text("user", "What is a heap?"))
    prompt = smollm_engine.prompt_for(messages)
    assert prompt == render_prompt(smollm_engine._loaded.tokenizer, messages, vision=False)
    assert "What is a heap?" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert smollm_engine.count_image_tokens(ask("What is a heap?")) == 0


# --- loading rules ---------------------------------------------------------------------------------------------


@pytest.fixture
def on_cpu(engine_device: str) -> None:
    """These rules are about what a CPU machine cannot do; on a GPU run (--engine-device cuda) they don't apply."""
    if engine_device != "cpu":
        pytest.skip("a CPU-only loading rule")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"dtype": DType.float16}, ["float16", "bfloat16"]),
        ({"attention": Attention.flash_attention_2}, ["flash_attention_2", "sdpa"]),
        ({"quantization": Quantization.awq}, ["AWQ", "QUANTIZATION_TYPE=none or int4"]),
        ({"quantization": Quantization.gptq}, ["GPTQ", "QUANTIZATION_TYPE=none or int4"]),
        ({"device": "cuda"}, ["cuda", "DEVICE=cpu"]),
    ],
)
async def test_impossible_settings_fail_clearly(smollm_spec, changes, words, on_cpu) -> None:
    engine = TransformersEngine(smollm_spec.with_(**changes))
    with pytest.raises(ModelLoadError) as err:
        await engine.start()
    assert err.value.status == 422
    for word in words:
        assert word in err.value.message


async def test_not_a_model_folder(smollm_spec, tmp_path) -> None:
    with pytest.raises(ModelLoadError):
        await TransformersEngine(smollm_spec.with_(folder=tmp_path)).start()


@pytest.mark.slow
async def test_int4_bitsandbytes_generates_on_cpu(smollm_spec, on_cpu) -> None:
    spec = smollm_spec.with_(quantization=Quantization.int4, dtype=DType.bfloat16, max_batch_size=2)
    engine = TransformersEngine(spec)
    await engine.start()
    try:
        assert "Linear4bit" in type(engine._loaded.model.model.layers[0].mlp.up_proj).__name__
        assert engine.info().quantization == "int4"
        result = await engine.complete(ask("What is a binary tree?", max_new_tokens=10))
        assert "tree" in result.text.lower()
    finally:
        await engine.shutdown()
    assert not await engine.health()


# --- vision (tiny random Qwen3-VL) -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_vision_engine_info_and_prompt(tiny_vl_engine) -> None:
    info = tiny_vl_engine.info()
    assert info.supports_images and info.engine == "transformers"
    request = look(noise(64, 64, 0))
    prompt = tiny_vl_engine.prompt_for(request.messages)
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe this image." in prompt
    budget = tiny_vl_engine._loaded.processor.image_processor.size
    assert budget["longest_edge"] == 256 * 256  # the spec's pixel budget, set on the image processor


@pytest.mark.slow
def test_image_tokens_follow_size_and_budget(tiny_vl_engine) -> None:
    small = tiny_vl_engine.count_image_tokens(look(noise(64, 64, 0)))
    larger = tiny_vl_engine.count_image_tokens(look(noise(128, 96, 0)))
    huge = tiny_vl_engine.count_image_tokens(look(noise(1024, 1024, 0)))
    assert small == 4  # one token per 32x32 px
    assert larger == 12
    assert 0 < huge <= 256 * 256 // (32 * 32)  # image_max_pixels=256*256 caps it at 64 tokens


@pytest.mark.slow
async def test_too_thin_an_image_is_400_not_a_processor_error(tiny_vl_engine) -> None:
    """Qwen's processor raises a bare ValueError past 200:1; the engine refuses first, naming the ratio."""
    with pytest.raises(InvalidRequestError, match="up to 200:1") as err:
        await tiny_vl_engine.complete(look(Image.new("RGB", (6400, 16))))
    assert err.value.status == 400
    assert (await tiny_vl_engine.complete(look(Image.new("RGB", (3200, 16))))).finish_reason  # 200:1 is served


@pytest.mark.slow
async def test_image_reaches_the_model(tiny_vl_engine) -> None:
    outputs = [(await tiny_vl_engine.complete(look(noise(64, 64, seed)))).text for seed in (1, 2)]
    outputs.append((await tiny_vl_engine.complete(look(Image.new("RGB", (64, 64), "red")))).text)
    assert len(set(outputs)) == 3, outputs


@pytest.mark.slow
async def test_vision_batched_equals_alone(tiny_vl_engine) -> None:
    requests = [
        look(noise(64, 64, 3)),
        look(noise(96, 160, 4), "What is shown?"),
        GenerationRequest(
            messages=(Message.text("user", "Hello there"),),
            sampling=SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True),
        ),
    ]
    alone = [(await tiny_vl_engine.complete(r)).text for r in requests]
    together = await asyncio.gather(*(tiny_vl_engine.complete(r) for r in requests))
    assert [r.text for r in together] == alone
    assert all(r.completion_tokens == 10 for r in together)
