"""One set of request rules (agent.engine.limits), two doors: the same bad request gets the same status and the same
message from FastAPI (`/v1/chat/completions`, the model in-process) and from the real Triton server (HTTP
`generate`; its error text starts with the status and code, which the gateway and the clients read back).

Both doors run with the same settings (tests/serving/triton/triton_fixtures.smollm_env: MAX_NEW_TOKENS=64, the other
limits at their defaults), so every message below names the same limit.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from agent.config import Settings, load_settings
from agent.engine.base import Engine
from agent.serving.model_server import create_app
from agent.serving.triton import protocol as proto
from tests.serving.triton import triton_fixtures
from tests.serving.triton.triton_fixtures import MODEL, RunningTriton, smollm_env

triton_smollm = triton_fixtures.triton_smollm  # the session's shared server (see triton_fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.triton]

GENERATE = f"/v2/models/{MODEL}/generate"


def _png_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(content: object) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


IMAGE = {"type": "image_url", "image_url": {"url": _png_url()}}
HI = user("hi")

# (name, messages, sampling fields as both doors name them, expected status, expected message)
CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any], int, str]] = [
    ("max_tokens over MAX_NEW_TOKENS", HI, {"max_tokens": 65}, 422, "max_tokens: 65 is more than MAX_NEW_TOKENS=64"),
    ("max_tokens zero", HI, {"max_tokens": 0}, 422, "max_tokens: must be at least 1, got 0"),
    ("temperature above 2", HI, {"temperature": 2.5}, 422, "temperature: must be within [0, 2], got 2.5"),
    ("temperature negative", HI, {"temperature": -1.0}, 422, "temperature: must be within [0, 2], got -1"),
    ("top_p zero", HI, {"top_p": 0.0}, 422, "top_p: must be within (0, 1], got 0"),
    ("top_p above 1", HI, {"top_p": 1.5}, 422, "top_p: must be within (0, 1], got 1.5"),
    ("seed negative", HI, {"seed": -1}, 422, "seed: must be within [0, 2**63-1], got -1"),
    ("five stops", HI, {"stop": ["a", "b", "c", "d", "e"]}, 422, "stop: 5 stop sequences, more than 4"),
    ("empty stop", HI, {"stop": [""]}, 422, "stop: stop sequences must not be empty"),
    (
        "stop over MAX_STOP_CHARS",
        HI,
        {"stop": ["s" * 257]},
        422,
        "stop: a stop sequence of 257 characters, more than MAX_STOP_CHARS=256",
    ),
    (
        "message over MAX_MESSAGE_CHARS",
        user("x" * 32_001),
        {},
        413,
        "messages: 32001 characters in one message, more than MAX_MESSAGE_CHARS=32000",
    ),
    (
        "images over MAX_IMAGES_PER_REQUEST",
        user([IMAGE] * 5 + [{"type": "text", "text": "what are these?"}]),
        {},
        413,
        "messages: 5 images, more than MAX_IMAGES_PER_REQUEST=4",
    ),
]


@pytest.fixture(scope="module")
async def fastapi_door(
    smollm_engine: Engine, smollm_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    """The FastAPI app over the session's SmolLM2 engine, with the settings the Triton server runs with."""
    env = {k.lower(): v for k, v in smollm_env(smollm_folder).items() if k.lower() in Settings.model_fields}
    settings = load_settings(**env, history_db=tmp_path_factory.mktemp("rules") / "history.sqlite3")
    app = create_app(settings, smollm_engine)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def fastapi_error(client: httpx.AsyncClient, messages: list[dict[str, Any]], fields: dict[str, Any]) -> tuple:
    response = await client.post("/v1/chat/completions", json={"messages": messages, **fields})
    error = response.json().get("error", {})
    return response.status_code, error.get("type"), error.get("message")


def triton_error(triton: RunningTriton, messages: list[dict[str, Any]], fields: dict[str, Any]) -> tuple:
    status, raw = triton.post(GENERATE, {"messages": json.dumps(messages), **fields})
    assert status != 200, raw[:300]
    error = proto.error_from_message(json.loads(raw)["error"])  # what the gateway and the clients read
    return error.status, error.code, error.message


@pytest.mark.parametrize(("name", "messages", "fields", "status", "message"), CASES, ids=[c[0] for c in CASES])
async def test_the_same_bad_request_gets_the_same_answer_at_both_doors(
    fastapi_door: httpx.AsyncClient,
    triton_smollm: RunningTriton,
    name: str,
    messages: list[dict[str, Any]],
    fields: dict[str, Any],
    status: int,
    message: str,
) -> None:
    code = {413: "payload_too_large", 422: "validation_error"}[status]
    assert await fastapi_error(fastapi_door, messages, fields) == (status, code, message)
    assert triton_error(triton_smollm, messages, fields) == (status, code, message)


async def test_a_lone_surrogate_is_422_at_both_doors(
    fastapi_door: httpx.AsyncClient, triton_smollm: RunningTriton
) -> None:
    """JSON may carry a lone UTF-16 surrogate; neither door can tokenize or store it. FastAPI names the exact field
    (`messages.0.content`), Triton the input (`messages`); the rule's words are the same."""
    body = b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'
    response = await fastapi_door.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    error = response.json()["error"]
    _, raw = triton_smollm.post(GENERATE, {"messages": '[{"role": "user", "content": "hi \\ud800"}]'})
    triton = proto.error_from_message(json.loads(raw)["error"])
    assert (response.status_code, triton.status) == (422, 422)
    assert (
        error["message"].split(": ", 1)[1]
        == triton.message.split(": ", 1)[1]
        == ("invalid Unicode (a lone surrogate at character 3)")
    )
