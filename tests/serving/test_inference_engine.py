"""Chat service: history trimming, commit-before-reply, images, sessions (FakeEngine, real SQLite)."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from agent.config import load_settings
from agent.engine.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError, UnsupportedInputError
from agent.engine.fake import FakeEngine
from agent.engine.types import ImagePart, SamplingParams
from agent.serving.api.engine_runner import EngineRunner
from agent.serving.api.history_store import HistoryStore
from agent.serving.inference_engine import ChatDelta, ChatReply, ChatService

SAMPLING = SamplingParams(max_new_tokens=64, temperature=0.0)


def png_b64(color: str = "red", size: tuple[int, int] = (8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def make_service(tmp_path: Path, engine: FakeEngine | None = None, **overrides: object) -> ChatService:
    settings = load_settings(history_db=tmp_path / "h.sqlite3", **overrides)
    engine = engine or FakeEngine()
    await engine.start()
    return ChatService(settings, HistoryStore(settings.history_db), EngineRunner(settings, engine=engine))


async def test_chat_answers_and_stores_the_turn(tmp_path: Path) -> None:
    service = await make_service(tmp_path)
    reply = await service.chat(None, "What is a binary tree?", None, SAMPLING)
    assert reply.response == "echo: What is a binary tree?"
    assert reply.session_id == "default" and reply.finish_reason == "stop"
    assert reply.usage.completion_tokens == 6 and reply.response_time > 0
    session, turns = await service.history(None)
    assert session == "default"
    assert [(t.role, t.content) for t in turns] == [("user", "What is a binary tree?"), ("assistant", reply.response)]


async def test_prompt_keeps_only_max_history_turns(tmp_path: Path) -> None:
    engine = FakeEngine()
    service = await make_service(tmp_path, engine, max_history=2)
    for i in range(4):
        await service.chat(None, f"question {i}", None, SAMPLING)
    assert engine.last_request is not None
    sent = [(m.role, m.text_content) for m in engine.last_request.messages]
    assert sent == [
        ("user", "question 1"),
        ("assistant", "echo: question 1"),
        ("user", "question 2"),
        ("assistant", "echo: question 2"),
        ("user", "question 3"),
    ]
    assert len((await service.history(None))[1]) == 8  # the store keeps everything


async def test_stream_commits_before_the_final_event(tmp_path: Path) -> None:
    service = await make_service(tmp_path)
    events = [e async for e in service.chat_stream(None, "stream me", None, SAMPLING)]
    assert [e.text for e in events if isinstance(e, ChatDelta)] == ["echo:", " stream", " me"]
    assert isinstance(events[-1], ChatReply)

    stream = service.chat_stream(None, "second turn", None, SAMPLING)
    async for event in stream:
        if isinstance(event, ChatReply):
            # The reply is only handed out once the turn is durable.
            assert (await service.history(None))[1][-1].content == "echo: second turn"
    assert len((await service.history(None))[1]) == 4


async def test_abandoned_stream_is_not_stored(tmp_path: Path) -> None:
    service = await make_service(tmp_path, FakeEngine(step_delay=0.01))
    stream = service.chat_stream(None, "a long question " * 5, None, SAMPLING)
    assert isinstance(await anext(stream), ChatDelta)
    await stream.aclose()
    assert (await service.history(None))[1] == []
    assert service.runner.admission.running == 0


async def test_aborted_generation_is_returned_but_not_stored(tmp_path: Path) -> None:
    engine = FakeEngine(step_delay=0.02)
    service = await make_service(tmp_path, engine)
    task = asyncio.create_task(service.chat(None, "one two three four five six", None, SAMPLING))
    await asyncio.sleep(0.05)
    assert engine.stats.running == 1
    # An abort from elsewhere (e.g. shutdown) ends the stream with finish_reason "abort".
    await engine.abort(engine.last_request.request_id)  # type: ignore[union-attr]
    reply = await task
    assert reply.finish_reason == "abort"
    assert (await service.history(None))[1] == []


async def test_image_reaches_engine_and_only_presence_is_stored(tmp_path: Path) -> None:
    engine = FakeEngine(supports_images=True)
    service = await make_service(tmp_path, engine)
    reply = await service.chat(None, "what colour?", png_b64(), SAMPLING)
    assert reply.response.endswith("[1 images]")
    assert engine.last_request is not None
    image = engine.last_request.messages[-1].parts[0]
    assert isinstance(image, ImagePart) and image.image.size == (8, 8) and image.image.mode == "RGB"
    turns = (await service.history(None))[1]
    assert [t.has_image for t in turns] == [True, False]
    # Follow-up turns send earlier turns as text: the earlier image is not resent.
    await service.chat(None, "and now?", None, SAMPLING)
    assert engine.last_request.images == []


async def test_image_errors(tmp_path: Path) -> None:
    text_only = await make_service(tmp_path, FakeEngine(model_name="SmolLM2"))
    with pytest.raises(UnsupportedInputError, match="'SmolLM2' is text-only.*load_model") as info:
        await text_only.chat(None, "see this", png_b64(), SAMPLING)
    assert info.value.status == 400

    vision = await make_service(tmp_path, FakeEngine(supports_images=True), max_image_pixels=1024)
    with pytest.raises(InvalidRequestError, match="invalid base64"):
        await vision.chat(None, "see this", "not base64!!", SAMPLING)
    with pytest.raises(PayloadTooLargeError, match="MAX_IMAGE_PIXELS"):
        await vision.chat(None, "see this", png_b64(size=(64, 64)), SAMPLING)
    with pytest.raises(PayloadTooLargeError, match="MAX_IMAGES_PER_REQUEST=4"):
        vision.require_images(5)
    assert (await vision.history(None))[1] == []


async def test_message_limit_and_sessions(tmp_path: Path) -> None:
    service = await make_service(tmp_path, max_message_chars=10)
    with pytest.raises(PayloadTooLargeError, match="MAX_MESSAGE_CHARS=10"):
        await service.chat(None, "x" * 11, None, SAMPLING)
    with pytest.raises(NotFoundError, match="POST /sessions"):
        await service.chat("unknown", "hi", None, SAMPLING)
    sid = await service.store.create()
    assert (await service.chat(sid, "hi", None, SAMPLING)).session_id == sid
    await service.delete_session(sid)
    with pytest.raises(NotFoundError):
        await service.delete_session(sid)
    # The default session always exists, even after being deleted.
    await service.delete_session("default")
    assert (await service.chat(None, "back", None, SAMPLING)).session_id == "default"
    assert await service.clear_history(None) == "default"
    assert (await service.history(None))[1] == []


async def quota_service(tmp_path: Path, engine: FakeEngine | None = None):
    from agent.serving.api.principals import Principal, Role
    from agent.serving.api.quotas import PrincipalLimits, PrincipalMetrics

    service = await make_service(tmp_path, engine)
    service.quotas = PrincipalLimits(service.store, service.settings, PrincipalMetrics())
    return service, Principal("ada", Role.learner)


async def test_a_turn_and_its_usage_are_written_once_together(tmp_path: Path) -> None:
    service, ada = await quota_service(tmp_path)
    reply = await service.chat(None, "What is a heap?", None, SAMPLING, ada)
    rows = await service.store.usage("ada")
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (1, reply.usage.prompt_tokens, reply.usage.completion_tokens)
    ]
    assert len((await service.history(None, ada))[1]) == 2


async def test_usage_of_an_answer_that_is_not_stored_is_written_alone(tmp_path: Path) -> None:
    service, ada = await quota_service(tmp_path, FakeEngine(step_delay=0.02))
    session = await service.resolve_session(None, ada)
    stream = service.chat_stream(session, "one two three", None, SAMPLING, ada)
    assert isinstance(await anext(stream), ChatDelta)
    await service.store.delete(session)  # gone while answering: the turn cannot be stored (404) ...
    with pytest.raises(NotFoundError):
        async for _ in stream:
            pass
    rows = await service.store.usage("ada")  # ... but the tokens were spent and are counted
    assert [r.requests for r in rows] == [1] and rows[0].completion_tokens > 0
