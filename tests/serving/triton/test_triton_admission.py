"""Admission at the Triton door (agent.serving.triton.admission): at most MAX_CONCURRENT_REQUESTS running and
MAX_QUEUE waiting, the excess refused at once, cancelled clients dropped, draining on shutdown.

The gate's rules on their own first (no server), then the shipped stack (`make run`: ONNX int4 in Triton) with
MAX_CONCURRENT_REQUESTS=2 and MAX_QUEUE=2, hit through HTTP generate and gRPC streaming.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from agent.engine.errors import NotReadyError, OverloadedError
from agent.serving.triton import admission
from agent.serving.triton import protocol as proto
from agent.serving.triton.admission import RequestGate, TrackedSender
from tests.serving.shipped_stack import SHIPPED_LIMITS, StackProcess, shipped_stack  # noqa: F401 (fixture)

FINAL = 1
RUNNING, WAITING = int(SHIPPED_LIMITS["MAX_CONCURRENT_REQUESTS"]), int(SHIPPED_LIMITS["MAX_QUEUE"])


class Sender:
    """Stands in for Triton's response sender in the gate's own tests: records what was sent."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.cancelled = False

    def send(self, response: object = None, flags: int = 0) -> None:
        self.sent.append(flags)

    def is_cancelled(self) -> bool:
        return self.cancelled


# ---------------------------------------------------------------------------------------------------- no server
def test_the_gate_admits_running_plus_waiting_and_refuses_the_rest_naming_the_limits() -> None:
    gate = RequestGate(max_running=2, max_waiting=1, grace=5, drain_file=None)
    senders = [TrackedSender(Sender(), FINAL) for _ in range(4)]
    assert [gate.admit(f"r{i}", s) for i, s in enumerate(senders[:3])] == [None, None, None]
    refused = gate.admit("r3", senders[3])
    assert isinstance(refused, OverloadedError) and refused.status == 429 and refused.retry_after == 1.0
    assert "MAX_CONCURRENT_REQUESTS=2, MAX_QUEUE=1" in refused.message
    gate.forget("r0")
    assert gate.admit("r3", senders[3]) is None  # a finished request frees its place
    gate.stop_accepting()
    draining = gate.admit("r4", TrackedSender(Sender(), FINAL))
    assert isinstance(draining, NotReadyError) and draining.status == 503 and "shutting down" in draining.message


def test_a_tracked_sender_never_asks_after_its_final_response() -> None:
    raw = Sender()
    raw.cancelled = True
    sender = TrackedSender(raw, FINAL)
    assert sender.is_cancelled() and not sender.finished
    sender.send(None, flags=FINAL)  # Triton frees the response factory here: asking again would crash the server
    assert sender.finished and not sender.is_cancelled() and raw.sent == [FINAL]


async def test_the_watch_drops_cancelled_clients_and_cancels_what_outlives_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "CLOSE_AFTER", 0.3)
    drain_file = tmp_path / "drain"
    gate = RequestGate(max_running=1, max_waiting=2, grace=0.3, drain_file=drain_file)
    watch = asyncio.create_task(gate.watch())
    gone, patient, waiting = Sender(), Sender(), Sender()
    tasks = {}
    for name, raw in (("running", patient), ("waiting-gone", gone), ("waiting", waiting)):
        assert gate.admit(name, TrackedSender(raw, FINAL, on_final=lambda n=name: gate.forget(n))) is None
        task = asyncio.ensure_future(gate.run(name, lambda: asyncio.sleep(30)))
        future: Future[None] = Future()
        task.add_done_callback(lambda t, f=future: f.cancel() if t.cancelled() else f.set_result(None))
        future.add_done_callback(lambda f, t=task: t.cancel() if f.cancelled() else None)
        gate.track(name, future)
        tasks[name] = task
    await asyncio.sleep(0.1)
    gone.cancelled = True  # the client hung up while its request waited for a slot
    await asyncio.sleep(0.4)
    assert tasks["waiting-gone"].cancelled() and not tasks["running"].done()
    assert gate.inflight == 3 and gone.sent == []  # counted until its final response is out ...
    await asyncio.sleep(0.8)  # a watch tick to see it ended, CLOSE_AFTER, a tick to close it
    assert gone.sent == [FINAL] and gate.inflight == 2  # ... which the watch sends when nothing else did
    drain_file.touch()  # what the launcher does before it signals the server
    await asyncio.sleep(0.3)
    assert isinstance(gate.admit("late", TrackedSender(Sender(), FINAL)), NotReadyError) and not gate.drained
    await asyncio.sleep(1.2)  # past the 0.3 s grace: every request left is cancelled, then closed
    assert all(t.cancelled() for t in tasks.values()) and gate.inflight == 0 and gate.drained
    assert [r.sent for r in (gone, patient, waiting)] == [[FINAL]] * 3  # exactly one final response each
    watch.cancel()


async def test_a_request_cancelled_before_its_coroutine_ever_ran_still_gets_its_final_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The defect of issue 14's first suspect: a request whose future is cancelled before the loop ever starts its
    coroutine never reaches the code that sends its final response; the watch closes it instead."""
    monkeypatch.setattr(admission, "CLOSE_AFTER", 0.0)
    closed: list[str] = []
    gate = RequestGate(max_running=1, max_waiting=1, grace=5, drain_file=None)
    gate.closer = lambda sender, why: (closed.append(why), sender.send(None, flags=FINAL))
    raw = Sender()
    assert gate.admit("r", TrackedSender(raw, FINAL, on_final=lambda: gate.forget("r"))) is None
    future: Future[None] = Future()
    gate.track("r", future)
    future.cancel()  # cancelled (client gone, grace over) before any coroutine ran
    gate._watch_once()
    assert raw.sent == [FINAL] and closed == ["the request was cancelled"] and gate.inflight == 0
    gate._watch_once()
    assert raw.sent == [FINAL]  # exactly once


def test_a_final_response_is_sent_once_even_when_sending_it_fails() -> None:
    class Failing(Sender):
        def send(self, response: object = None, flags: int = 0) -> None:
            super().send(response, flags)
            raise RuntimeError("stream gone")

    finals: list[int] = []
    sender = TrackedSender(Failing(), FINAL, on_final=lambda: finals.append(1))
    with pytest.raises(RuntimeError, match="stream gone"):
        sender.send(None, flags=FINAL)
    assert sender.finished and finals == [1]  # counted out: the stub closed the sender before it sent
    with pytest.raises(RuntimeError, match="already sent"):
        sender.send(None, flags=FINAL)


# ---------------------------------------------------------------------------------------------------- real server
def grpc_request(text: str, max_tokens: int) -> list[grpcclient.InferInput]:
    """Inputs without a batch dimension (the model's max_batch_size is 0, like vllm_backend's)."""
    out = []
    for name, value, dtype in (("text_input", text.encode(), np.object_), ("max_tokens", max_tokens, np.int32)):
        tensor = grpcclient.InferInput(name, [1], proto.INPUT_DATATYPES[name])
        tensor.set_data_from_numpy(np.array([value], dtype=dtype))
        out.append(tensor)
    ignore = grpcclient.InferInput("ignore_eos", [1], "BOOL")
    ignore.set_data_from_numpy(np.array([True]))
    return [*out, ignore]


@pytest.mark.slow
@pytest.mark.triton
def test_http_generate_over_the_limit_is_refused_at_once(shipped_stack: StackProcess) -> None:  # noqa: F811
    url = f"http://{shipped_stack.triton_http}/v2/models/qwen3-vl/generate"
    clients = 2 * (RUNNING + WAITING)
    barrier = threading.Barrier(clients)

    def one(i: int) -> tuple[int, float, str]:
        barrier.wait()
        started = time.monotonic()
        body = {"text_input": f"Count to a hundred ({i}).", "max_tokens": 32, "ignore_eos": True}
        response = httpx.post(url, json=body, timeout=300)
        return response.status_code, time.monotonic() - started, response.text

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    answered = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert len(answered) == RUNNING + WAITING, results
    assert all(json.loads(r[2])["completion_tokens"] == 32 for r in answered)
    # Triton's HTTP generate answers every model error with 400; the text carries our status and the limits.
    assert len(refused) == clients - RUNNING - WAITING and all(r[0] == 400 for r in refused), refused
    assert all(json.loads(r[2])["error"].startswith("429 overloaded: server busy") for r in refused), refused
    assert all(f"MAX_CONCURRENT_REQUESTS={RUNNING}, MAX_QUEUE={WAITING}" in r[2] for r in refused)
    assert max(r[1] for r in refused) < 2.0, [round(r[1], 2) for r in refused]  # at once, not after the queue
    assert shipped_stack.triton_get("/v2/models/qwen3-vl/ready") == 200
    assert shipped_stack.triton_get("/v2/health/ready") == 200


@pytest.mark.slow
@pytest.mark.triton
def test_grpc_streams_over_the_limit_are_refused_at_once(shipped_stack: StackProcess) -> None:  # noqa: F811
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(shipped_stack.triton_grpc)
    client.start_stream(callback=lambda result, error: responses.put((time.monotonic(), result, error)))
    count = 2 * (RUNNING + WAITING)
    try:
        sent = time.monotonic()
        for i in range(count):
            client.async_stream_infer("qwen3-vl", grpc_request(f"Tell a story ({i}).", 32), request_id=f"s{i}")
        got = [responses.get(timeout=300) for _ in range(count)]
    finally:
        client.stop_stream()
        client.close()
    errors = [(when - sent, error.message()) for when, _, error in got if error is not None]
    answers = [result for _, result, error in got if error is None]
    assert len(answers) == RUNNING + WAITING and len(errors) == count - RUNNING - WAITING, errors
    assert all("429 overloaded: server busy" in message for _, message in errors), errors
    assert max(after for after, _ in errors) < 2.0, errors
    assert all(r.as_numpy("finish_reason")[0] in (b"length", b"stop") for r in answers)
    assert shipped_stack.triton_get("/v2/models/qwen3-vl/ready") == 200
