"""The event-loop side of the scheduler-thread engines (ONNX, OpenVINO): request checks, the thread-safe channel and
its chunk loop (errors, early close, coalescing). Both engines run it for real in their own and the contract tests."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.engine.errors import EngineFailure, InvalidRequestError
from agent.engine.request_stream import ChunkChannel, check_sampling, coalesce, room_after
from agent.engine.types import GenerationChunk, SamplingParams


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (SamplingParams(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (SamplingParams(top_p=0.0), "top_p must be in (0, 1]"),
        (SamplingParams(top_p=1.5), "top_p must be in (0, 1]"),
    ],
)
def test_sampling_a_scheduler_cannot_run_is_a_400(sampling: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace("]", r"\]")):
        check_sampling(sampling)
    check_sampling(SamplingParams(max_new_tokens=1, top_p=1.0))  # the edges that are allowed


def test_room_after_the_prompt() -> None:
    assert room_after(10, 11) == 1
    with pytest.raises(InvalidRequestError, match="prompt is 11 tokens; the model's context is 11"):
        room_after(11, 11)


async def _collect(channel: ChunkChannel, aborted: list[bool]) -> list[GenerationChunk]:
    return [chunk async for chunk in channel.chunks("Test", lambda: aborted.append(True))]


async def test_chunks_from_another_thread_arrive_in_order_and_a_finished_stream_is_not_aborted() -> None:
    channel, aborted = ChunkChannel(), []
    sent = [GenerationChunk("r", "a", 3, 1), GenerationChunk("r", "b", 3, 2, "stop")]
    thread = threading.Thread(target=lambda: [channel.put(chunk) for chunk in sent])
    thread.start()
    thread.join()
    received = await _collect(channel, aborted)
    assert "".join(c.text for c in received) == "ab" and received[-1].finish_reason == "stop"
    assert aborted == []


async def test_a_request_error_is_raised_as_it_is_and_a_crash_becomes_an_engine_failure() -> None:
    channel, aborted = ChunkChannel(), []
    refused = InvalidRequestError("grammar refused")
    channel.put(refused)
    with pytest.raises(InvalidRequestError) as caught:
        await _collect(channel, aborted)
    assert caught.value is refused and aborted == [True]

    channel, aborted = ChunkChannel(), []
    channel.put(GenerationChunk("r", "a", 3, 1))
    channel.put(RuntimeError("kernel crashed"))
    received: list[str] = []
    with pytest.raises(EngineFailure, match="Test generation failed: kernel crashed"):
        async for chunk in channel.chunks("Test", lambda: aborted.append(True)):
            received.append(chunk.text)
    assert received == ["a"] and aborted == [True]  # the text before the crash is delivered first


async def test_closing_the_stream_early_aborts_the_request() -> None:
    channel, aborted = ChunkChannel(), []
    channel.put(GenerationChunk("r", "a", 3, 1))
    chunks = channel.chunks("Test", lambda: aborted.append(True))
    assert (await anext(chunks)).text == "a"
    assert aborted == []
    await chunks.aclose()
    assert aborted == [True]


async def test_chunks_waiting_for_a_slow_consumer_are_coalesced_in_order() -> None:
    """A consumer that fell behind gets one chunk for what waited (text joined, the last one's counts and reason);
    one that keeps up gets every chunk alone; an error waiting behind text comes after that text."""
    queue: asyncio.Queue = asyncio.Queue()
    first = GenerationChunk("r", "a", 7, 1)
    assert coalesce(first, queue) == (first, None)  # nothing waiting: unchanged
    for chunk in (GenerationChunk("r", "b", 7, 2), GenerationChunk("r", "c", 7, 3, "length")):
        queue.put_nowait(chunk)
    queue.put_nowait(GenerationChunk("r", "never", 7, 4))  # after the final chunk: not consumed
    merged, failure = coalesce(first, queue)
    assert merged == GenerationChunk("r", "abc", 7, 3, "length") and failure is None and queue.qsize() == 1

    boom = RuntimeError("boom")
    queue = asyncio.Queue()
    queue.put_nowait(GenerationChunk("r", "b", 7, 2))
    queue.put_nowait(boom)
    assert coalesce(first, queue) == (GenerationChunk("r", "ab", 7, 2), boom)
