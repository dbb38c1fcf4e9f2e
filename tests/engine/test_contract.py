"""The engine contract: every engine kind (tests/engine/conftest.py ENGINE_KINDS) must pass these on SmolLM2-135M."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from agent.engine.errors import InvalidRequestError, UnsupportedInputError
from agent.engine.types import GenerationChunk, GenerationRequest, ImagePart, Message, SamplingParams, TextPart

pytestmark = pytest.mark.slow


def ask(text: str, **sampling: object) -> GenerationRequest:
    params = {"temperature": 0.0, "max_new_tokens": 16, **sampling}
    return GenerationRequest(messages=(Message.text("user", text),), sampling=SamplingParams(**params))


async def collect(engine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


async def wait_until_idle(engine, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (engine.stats.running or engine.stats.waiting) and loop.time() < deadline:
        await asyncio.sleep(0.02)


async def test_stream_shape(engine) -> None:
    request = ask("Name three colors.", max_new_tokens=12, ignore_eos=True)
    chunks = await collect(engine, request)
    result = await engine.complete(request)
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.request_id == request.request_id for c in chunks)
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 12
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] >= 1
    assert len({c.prompt_tokens for c in chunks}) == 1 and chunks[0].prompt_tokens > 5
    text = "".join(c.text for c in chunks)
    assert text.strip() and "\ufffd" not in text
    assert text == result.text  # greedy: the streamed deltas are exactly the whole answer


async def test_greedy_is_deterministic(engine) -> None:
    first = await engine.complete(ask("What is a stack?"))
    second = await engine.complete(ask("What is a stack?"))
    assert first.text == second.text and first.text.strip()


async def test_seed_reproduces_sampling(engine) -> None:
    def sampled(seed: int) -> GenerationRequest:
        return ask("Tell me a word.", temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=8, ignore_eos=True)

    a, b = await engine.complete(sampled(7)), await engine.complete(sampled(7))
    assert a.text == b.text
    others = [(await engine.complete(sampled(seed))).text for seed in (8, 9)]
    assert any(text != a.text for text in others), "different seeds never changed the sampled text"


async def test_max_new_tokens_with_ignore_eos(engine) -> None:
    result = await engine.complete(ask("Hi", max_new_tokens=5, ignore_eos=True))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5


async def test_eos_ends_with_stop(engine) -> None:
    result = await engine.complete(ask("Say hello.", max_new_tokens=200))
    assert result.finish_reason == "stop"
    assert result.completion_tokens < 200


async def test_stop_string_truncates(engine) -> None:
    full = (await engine.complete(ask("What is a binary tree?", max_new_tokens=24))).text
    words = full.split()
    assert len(words) > 6, full
    stop = " " + words[4]
    expected = full[: full.index(stop)]
    result = await engine.complete(ask("What is a binary tree?", max_new_tokens=24, stop=(stop, "\x00never")))
    assert result.finish_reason == "stop"
    assert result.text == expected


async def test_abort_ends_stream(engine) -> None:
    request = ask("Count to one hundred.", max_new_tokens=400, ignore_eos=True)
    chunks: list[GenerationChunk] = []
    async for chunk in engine.generate(request):
        chunks.append(chunk)
        if len(chunks) == 2:
            await engine.abort(request.request_id)
    assert chunks[-1].finish_reason == "abort"
    assert chunks[-1].completion_tokens < 400
    await wait_until_idle(engine)
    assert engine.stats.running == 0


async def test_closing_stream_frees_request(engine) -> None:
    stream = engine.generate(ask("Count to one hundred.", max_new_tokens=400, ignore_eos=True))
    first = await anext(stream)
    assert not first.finished
    await stream.aclose()
    await wait_until_idle(engine)
    assert engine.stats.running == 0 and engine.stats.waiting == 0


async def test_concurrent_requests_share_batches(engine) -> None:
    engine.stats.max_batch_seen = 0
    requests = [ask(f"What is {n} plus {n}?", max_new_tokens=8, ignore_eos=True) for n in range(16)]
    results = await asyncio.gather(*(engine.complete(r) for r in requests))
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert all(r.finish_reason == "length" and r.completion_tokens == 8 for r in results)
    assert engine.stats.max_batch_seen > 1


async def test_image_on_text_model_is_refused(engine) -> None:
    message = Message(role="user", parts=(ImagePart(Image.new("RGB", (32, 32))), TextPart("What is this?")))
    with pytest.raises(UnsupportedInputError) as err:
        await collect(engine, GenerationRequest(messages=(message,)))
    assert err.value.status == 400
    assert "vision" in err.value.message.lower()


async def test_info(engine, engine_kind: str, engine_device: str) -> None:
    info = engine.info()
    assert info.engine == engine_kind
    assert info.model_name == "SmolLM2-135M-Instruct"
    assert info.supports_images is False
    assert info.context_length >= 2048
    assert info.device == engine_device
    assert await engine.health()


async def test_coherent_answer(engine) -> None:
    result = await engine.complete(ask("What is a binary tree?", max_new_tokens=48))
    text = result.text.lower()
    assert "tree" in text
    assert "node" in text or "child" in text


async def test_prompt_longer_than_context_is_400(engine) -> None:
    too_long = "word " * (engine.info().context_length + 10)
    with pytest.raises(InvalidRequestError) as err:
        await collect(engine, ask(too_long))
    assert err.value.status == 400
    assert engine.stats.running == 0
