"""Cache-aware routing over several Tritons: the hash ring alone, then two real Triton servers, one stopped."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.config import load_settings
from agent.engine.types import GenerationRequest, Message, SamplingParams
from agent.serving.triton.routing import HashRing, RoutedGatewayEngine, gateway_from_settings, grpc_urls, routing_key
from tests.serving.triton import triton_fixtures

triton_smollm = triton_fixtures.triton_smollm  # the session's shared server
SHORT = SamplingParams(max_new_tokens=2, temperature=0.0)


def conversation(first: str, *more: str) -> GenerationRequest:
    messages = [Message.text("user", first)]
    for text in more:
        messages += [Message.text("assistant", "ok"), Message.text("user", text)]
    return GenerationRequest(messages=tuple(messages), sampling=SHORT)


def test_ring_is_consistent_and_spreads_keys() -> None:
    ring = HashRing(["a:1", "b:1", "c:1"])
    keys = [f"conversation {i}" for i in range(600)]
    owners = Counter(ring.order(k)[0] for k in keys)
    assert set(owners) == {"a:1", "b:1", "c:1"} and min(owners.values()) > 100  # roughly even
    assert all(sorted(ring.order(k)) == ["a:1", "b:1", "c:1"] for k in keys[:20])  # every node, as fallbacks
    smaller = HashRing(["a:1", "b:1"])
    moved = [k for k in keys if ring.order(k)[0] != smaller.order(k)[0]]
    assert {ring.order(k)[0] for k in moved} == {"c:1"}  # only c's keys move when c leaves
    assert grpc_urls(" h1:8002, h2:8002 ,") == ["h1:8002", "h2:8002"]


def test_a_conversation_keeps_its_key_while_it_grows() -> None:
    first = routing_key(conversation("What is a heap?"))
    assert first == routing_key(conversation("What is a heap?", "And a stack?"))
    assert first == routing_key(conversation("What is a heap?", "And a queue?", "Why?"))
    assert first != routing_key(conversation("What is a trie?"))
    system = (Message.text("system", "You are a tutor."),)
    tutored = GenerationRequest(messages=system + conversation("What is a heap?").messages)
    assert routing_key(tutored) != first and routing_key(tutored).endswith("user:What is a heap?")


@pytest.mark.slow
@pytest.mark.triton
def test_round_robin_alternates_and_still_skips_a_down_server() -> None:
    from agent.config import TritonRouting
    from agent.engine.fake import FakeEngine

    engine = RoutedGatewayEngine({"a": FakeEngine(), "b": FakeEngine()}, policy=TritonRouting.round_robin)
    engine._up = {"a", "b"}
    request = conversation("Conversation 1: what is a tree?")
    assert [engine.candidates(request)[0] for _ in range(4)] == ["a", "b", "a", "b"]
    engine._down_until["b"] = time.monotonic() + 60
    assert [engine.candidates(request) for _ in range(2)] == [["a", "b"], ["a", "b"]]  # b last while down
    affinity = RoutedGatewayEngine({"a": FakeEngine(), "b": FakeEngine()})
    affinity._up = {"a", "b"}
    assert len({affinity.candidates(request)[0] for _ in range(4)}) == 1


async def test_routes_conversations_to_one_server_and_falls_over(
    triton_smollm: triton_fixtures.RunningTriton, smollm_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A second real Triton, on the light ONNX int4 engine.
    env = triton_fixtures.smollm_env(smollm_folder) | {"LOADING_STRATEGY": "onnx", "QUANTIZATION_TYPE": "int4"}
    second = triton_fixtures.acquire("routing-second", env, tmp_path_factory.mktemp("triton-routing"))
    released = False
    urls = [triton_smollm.grpc_url, second.grpc_url]
    settings = load_settings(
        loading_strategy="triton", triton_grpc_url=",".join(urls), triton_http_url=triton_smollm.http_url,
        triton_metrics_port=triton_smollm.server.cfg.metrics_port,
    )  # fmt: skip
    engine = gateway_from_settings(settings)
    assert isinstance(engine, RoutedGatewayEngine)
    try:
        await engine.start()
        deadline = time.monotonic() + 60
        while len(engine._up) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert len(engine._up) == 2
        # three conversations owned by each server (by the ring), two turns each: both turns on the owner
        candidates = (f"Conversation {i}: what is a tree?" for i in range(1000))
        firsts = {url: [] for url in urls}
        for first in candidates:
            owner = engine.ring.order(routing_key(conversation(first)))[0]
            if len(firsts[owner]) < 3:
                firsts[owner].append(first)
            if all(len(f) == 3 for f in firsts.values()):
                break
        for url, mine in firsts.items():
            before = Counter(engine.served)
            for first in mine:
                for request in (conversation(first), conversation(first, "And then?")):
                    chunks = [c async for c in engine.generate(request)]
                    assert chunks[-1].finish_reason in ("stop", "length")
            assert engine.served - before == Counter({url: 6}), (url, engine.served - before)
        triton_fixtures.release("routing-second")  # stops it
        released = True
        before = Counter(engine.served)
        for first in firsts[second.grpc_url]:  # the stopped server's conversations: answered by the other one
            chunks = [c async for c in engine.generate(conversation(first, "Still there?"))]
            assert chunks[-1].finish_reason in ("stop", "length")
        assert engine.served - before == Counter({triton_smollm.grpc_url: 3})
    finally:
        await engine.shutdown()
        if not released:
            triton_fixtures.release("routing-second")
