"""API keys, the web UI's key page and CORS, against the real FastAPI server (uvicorn on a free port, SmolLM2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from agent.config import SettingsError, load_settings
from agent.engine.base import Engine
from agent.serving.api.auth import COOKIE_NAME, ApiKeys, path_is_public
from agent.serving.model_server import create_app
from tests.serving.live import serving

KEY, OTHER_KEY = "k-3f9a1c7e2b", "second-key-77"
BODY = {"dtype": "no-such-dtype"}  # POSTed to every route: no route does heavy work with it (/load_model: 422)
PUBLIC = {"/health", "/metrics"}


def test_keys_match_exactly() -> None:
    keys = ApiKeys([KEY, OTHER_KEY])
    assert keys.enabled and keys.check(KEY) and keys.check(OTHER_KEY)
    for wrong in (None, "", KEY[:-1], KEY + "x", KEY.upper(), f" {KEY}"):
        assert not keys.check(wrong), wrong
    assert not ApiKeys([]).enabled and not ApiKeys([]).check(KEY)


def test_public_paths_exact_or_prefix() -> None:
    assert path_is_public("/health", ["/health"]) and not path_is_public("/healthz", ["/health"])
    assert path_is_public("/v1/models", ["/v1/models*"]) and not path_is_public("/v1/chat", ["/v1/models*"])


def test_settings_parse_and_hide_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", f" {KEY} ,,{OTHER_KEY}")
    monkeypatch.setenv("PUBLIC_PATHS", "/health")
    monkeypatch.setenv("CORS_ORIGINS", "https://tutor.example.com, http://localhost:5173")
    s = load_settings()
    assert s.api_key_list == [KEY, OTHER_KEY] and KEY not in repr(s)
    assert s.public_paths == ["/health"]
    assert s.cors_origins == ["https://tutor.example.com", "http://localhost:5173"]
    monkeypatch.setenv("API_KEYS", " , ")
    assert load_settings().api_key_list == []
    monkeypatch.setenv("CORS_ORIGINS", "tutor.example.com")
    with pytest.raises(SettingsError, match="CORS_ORIGINS"):
        load_settings()


def every_route(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every route of the app (API routes and the docs pages; not the web UI mount)."""
    out = []
    for route in app.routes:
        if isinstance(route, Route):
            path = route.path.replace("{session_id}", "some-session")
            out += [(method, path) for method in sorted(route.methods - {"HEAD"})]
    return out


@pytest.fixture
async def keyed(smollm_engine: Engine, tmp_path: Path) -> AsyncIterator[tuple[object, str]]:
    settings = load_settings(
        history_db=tmp_path / "h.sqlite3",
        api_keys=f"{KEY},{OTHER_KEY}",
        cors_origins=["https://tutor.example.com"],
        max_new_tokens=4,
        temperature=0.0,
    )
    app = create_app(settings, smollm_engine)
    async with serving(app) as url:
        yield app, url


@pytest.mark.slow
async def test_every_route_needs_a_key_except_the_public_ones(keyed: tuple[object, str]) -> None:
    app, url = keyed
    routes = every_route(app)
    assert len(routes) >= 14
    assert {("GET", "/docs"), ("POST", "/chat"), ("POST", "/v1/chat/completions")} <= set(routes)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Cookie": "x=1"}):
                response = await client.request(method, path, headers=headers, json=BODY if method == "POST" else None)
                if path in PUBLIC:
                    assert response.status_code == 200, (method, path, response.text)
                else:
                    assert response.status_code == 401, (method, path, headers, response.status_code)
                    assert response.headers["www-authenticate"] == "Bearer"
                    assert response.json()["error"]["type"] == "unauthorized"
        # With a key every route is let through: what answers is the route itself (200, or its own 4xx for BODY).
        for key in (KEY, OTHER_KEY):
            for method, path in routes:
                response = await client.request(
                    method, path, headers={"Authorization": f"Bearer {key}"}, json=BODY if method == "POST" else None
                )
                assert response.status_code != 401 and response.status_code < 500, (method, path, response.text)
        auth = {"Authorization": f"bearer {KEY}"}  # the scheme is case-insensitive
        chat = await client.post("/chat", headers=auth, json={"message": "What is a stack?"})
        assert chat.status_code == 200 and chat.json()["response"].strip()
        assert len((await client.get("/history", headers=auth)).json()["history"]) == 2
        assert (await client.get("/v1/models", headers=auth)).json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        # an unknown path is refused like a real one without a key (the route list is not probed), 404 with it
        assert (await client.get("/no-such-route")).status_code == 401
        assert (await client.get("/no-such-route", headers=auth)).status_code == 404


@pytest.mark.slow
async def test_web_ui_asks_for_the_key_then_works_with_the_cookie(keyed: tuple[object, str]) -> None:
    _, url = keyed
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        page = await client.get("/")
        assert page.status_code == 303 and page.headers["location"] == "login"
        assert (await client.get("/js/app.js")).status_code == 200  # static assets hold no data: public
        form = await client.get("/login")
        assert form.status_code == 200 and 'name="key"' in form.text
        wrong = await client.post("/login", data={"key": "nope"})
        assert wrong.status_code == 401 and COOKIE_NAME not in wrong.headers.get("set-cookie", "")
        evil = await client.post("/login", data={"key": KEY}, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403
        login = await client.post("/login", data={"key": KEY}, headers={"Origin": url})
        assert login.status_code == 303
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        # the browser now carries the cookie: the page and its API calls work
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/sessions")).status_code == 200
        logout = await client.post("/logout")
        assert logout.status_code == 303
        client.cookies.clear()
        assert (await client.get("/sessions")).status_code == 401


@pytest.mark.slow
async def test_cors_allow_list(keyed: tuple[object, str]) -> None:
    _, url = keyed
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with httpx.AsyncClient(base_url=url) as client:
        ok = await client.options("/chat", headers={"Origin": "https://tutor.example.com", **preflight})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://tutor.example.com"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        bad = await client.options("/chat", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in bad.headers
        # a refused request still carries CORS headers for an allowed origin (the browser can read the 401)
        refused = await client.get("/sessions", headers={"Origin": "https://tutor.example.com"})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == "https://tutor.example.com"
        other = await client.get("/health", headers={"Origin": "https://evil.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


@pytest.mark.slow
async def test_without_keys_nothing_is_asked(smollm_engine: Engine, tmp_path: Path) -> None:
    app = create_app(load_settings(history_db=tmp_path / "h.sqlite3"), smollm_engine)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/sessions")).status_code == 200
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/login")).status_code == 404
        # no CORS_ORIGINS: no cross-origin grants at all
        response = await client.get("/health", headers={"Origin": "https://tutor.example.com"})
        assert "access-control-allow-origin" not in response.headers
