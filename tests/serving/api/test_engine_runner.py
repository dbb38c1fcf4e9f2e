"""Engine runner: background loading (503), admission (429), abort on close, atomic model swaps."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from agent.config import Settings, load_settings
from agent.engine.errors import ModelLoadError, NotReadyError, OverloadedError
from agent.engine.fake import FakeEngine
from agent.engine.types import GenerationChunk, GenerationRequest, Message, SamplingParams
from agent.serving.api.engine_runner import EngineRunner


class RecordingEngine(FakeEngine):
    """FakeEngine that records aborts and shutdowns."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.aborted: list[str] = []
        self.shutdowns = 0

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        await super().abort(request_id)

    async def shutdown(self) -> None:
        self.shutdowns += 1
        await super().shutdown()


async def started(engine: FakeEngine) -> FakeEngine:
    await engine.start()
    return engine


def settings(**overrides: object) -> Settings:
    return load_settings(history_db="unused.sqlite3", **overrides)


def request(text: str = "one two three four", max_new_tokens: int = 64) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message.text("user", text),), sampling=SamplingParams(max_new_tokens=max_new_tokens)
    )


async def collect(runner: EngineRunner, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in runner.generate(req)]


async def test_generate_streams_and_observes() -> None:
    seen: dict[str, list[float]] = {"queued": [], "ttft": [], "itl": [], "finished": []}

    class Observer:
        def queued(self, s: float) -> None:
            seen["queued"].append(s)

        def first_token(self, s: float) -> None:
            seen["ttft"].append(s)

        def inter_token(self, s: float) -> None:
            seen["itl"].append(s)

        def finished(self, p: int, c: int) -> None:
            seen["finished"].append(c)

        def engine_step(self, stats: object) -> None:
            pass

    runner = EngineRunner(settings(), engine=await started(FakeEngine()), observer=Observer())
    chunks = await collect(runner, request("a b c"))
    assert "".join(c.text for c in chunks) == "echo: a b c"
    assert chunks[-1].finish_reason == "stop"
    assert len(seen["queued"]) == 1 and len(seen["ttft"]) == 1 and len(seen["itl"]) == 3
    assert seen["finished"] == [4]
    assert runner.admission.running == 0


async def test_overload_answers_429_with_retry_after() -> None:
    engine = await started(FakeEngine(step_delay=0.05))
    runner = EngineRunner(settings(max_concurrent_requests=1, max_queue=1), engine=engine)
    first = asyncio.create_task(collect(runner, request()))
    second = asyncio.create_task(collect(runner, request()))
    await asyncio.sleep(0.02)
    assert (runner.admission.running, runner.admission.waiting) == (1, 1)
    with pytest.raises(OverloadedError) as info:
        await collect(runner, request())
    assert info.value.status == 429 and info.value.retry_after
    assert "MAX_QUEUE=1" in info.value.message
    assert len(await first) == 5 and len(await second) == 5  # the admitted ones still finish
    assert (runner.admission.running, runner.admission.waiting) == (0, 0)


async def test_closing_the_stream_aborts_the_engine_request() -> None:
    engine = RecordingEngine(step_delay=0.02)
    await engine.start()
    runner = EngineRunner(settings(), engine=engine)
    req = request("many words " * 20)
    stream = runner.generate(req)
    first = await anext(stream)
    assert first.text == "echo:"
    await stream.aclose()
    assert engine.aborted == [req.request_id]
    assert engine.stats.running == 0 and runner.admission.running == 0


async def test_cancelling_the_consumer_aborts_the_engine_request() -> None:
    engine = RecordingEngine(step_delay=0.02)
    await engine.start()
    runner = EngineRunner(settings(), engine=engine)
    req = request("many words " * 20)
    task = asyncio.create_task(collect(runner, req))
    await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert engine.aborted == [req.request_id]
    assert engine.stats.running == 0 and runner.admission.running == 0


async def test_finished_requests_are_not_aborted() -> None:
    engine = RecordingEngine()
    await engine.start()
    runner = EngineRunner(settings(), engine=engine)
    await collect(runner, request())
    assert engine.aborted == [] and engine.stats.running == 0


async def test_503_while_loading_then_ready() -> None:
    gate = asyncio.Event()
    engine = await started(FakeEngine())

    async def slow_loader(_: Settings) -> FakeEngine:
        await gate.wait()
        return engine

    runner = EngineRunner(settings(), loader=slow_loader)
    runner.start()
    await asyncio.sleep(0)
    assert runner.status().state == "loading"
    with pytest.raises(NotReadyError) as info:
        await collect(runner, request())
    assert info.value.status == 503 and info.value.retry_after
    gate.set()
    for _ in range(100):
        if runner.status().state == "ready":
            break
        await asyncio.sleep(0.01)
    assert runner.status().state == "ready" and await runner.healthy()
    assert len(await collect(runner, request())) == 5
    await runner.shutdown()
    assert not engine.started  # loaded by the runner, so shut down by it


async def test_failed_initial_load_reports_the_reason() -> None:
    async def failing(_: Settings) -> FakeEngine:
        raise ModelLoadError("MODEL_PATH='/nope': no such folder")

    runner = EngineRunner(settings(), loader=failing)
    runner.start()
    await asyncio.sleep(0.01)
    status = runner.status()
    assert status.state == "failed" and "no such folder" in (status.error or "")
    with pytest.raises(NotReadyError, match="no such folder"):
        runner.info()
    await runner.shutdown()


async def test_swap_lets_in_flight_requests_finish_on_the_old_engine() -> None:
    old = RecordingEngine(step_delay=0.03, model_name="old")
    await old.start()
    new = await started(FakeEngine(model_name="new"))

    async def loader(_: Settings) -> FakeEngine:
        return new

    runner = EngineRunner(settings(), engine=old, loader=loader)
    in_flight = asyncio.create_task(collect(runner, request("a b c d e f")))
    await asyncio.sleep(0.05)
    info = await runner.load_model({"model_path": "/models/new"})
    assert info.model_name == "new" and runner.settings.model_path == "/models/new"
    assert runner.info().model_name == "new"
    assert not in_flight.done()
    assert "".join(c.text for c in await in_flight) == "echo: a b c d e f"  # finished on the old engine
    assert old.aborted == [] and new.last_request is None
    await collect(runner, request())
    assert new.last_request is not None  # new requests go to the new engine
    await runner.shutdown()
    assert old.shutdowns == 0  # an injected engine belongs to whoever started it


async def test_replaced_owned_engine_is_shut_down_after_its_last_request() -> None:
    engines = [RecordingEngine(step_delay=0.03, model_name="first"), RecordingEngine(model_name="second")]

    async def loader(_: Settings) -> FakeEngine:
        engine = engines.pop(0)
        await engine.start()
        return engine

    first, second = engines
    runner = EngineRunner(settings(), loader=loader)
    runner.start()
    while runner.status().state != "ready":
        await asyncio.sleep(0.01)
    in_flight = asyncio.create_task(collect(runner, request("a b c d e f")))
    await asyncio.sleep(0.05)
    await runner.load_model({})
    assert first.shutdowns == 0  # still answering
    await in_flight
    await asyncio.sleep(0.01)
    assert first.shutdowns == 1 and second.shutdowns == 0
    await runner.shutdown()
    assert second.shutdowns == 1


async def test_failed_load_keeps_the_old_engine_serving() -> None:
    calls: list[str] = []

    async def broken(s: Settings) -> FakeEngine:
        calls.append(str(s.model_path))
        if s.model_path == "/typed/wrong":
            raise ModelLoadError("MODEL_PATH='/typed/wrong': no such folder")
        raise RuntimeError("weights are corrupt")

    runner = EngineRunner(settings(), engine=await started(FakeEngine(model_name="kept")), loader=broken)
    with pytest.raises(ModelLoadError, match="no such folder") as info:
        await runner.load_model({"model_path": "/typed/wrong"})
    assert info.value.status == 422
    with pytest.raises(ModelLoadError, match="RuntimeError: weights are corrupt"):
        await runner.load_model({"model_path": "/corrupt"})
    assert runner.info().model_name == "kept" and runner.settings.model_path is None
    assert len(await collect(runner, request())) == 5
    assert calls == ["/typed/wrong", "/corrupt"]


async def test_concurrent_loads_are_serialized() -> None:
    active = 0
    most = 0

    async def loader(_: Settings) -> FakeEngine:
        nonlocal active, most
        active += 1
        most = max(most, active)
        await asyncio.sleep(0.02)
        active -= 1
        return await started(FakeEngine())

    runner = EngineRunner(settings(), engine=await started(FakeEngine()), loader=loader)
    await asyncio.gather(*(runner.load_model({}) for _ in range(3)))
    assert most == 1
    await runner.shutdown()
