"""API keys, the web UI's key page and CORS, against the real FastAPI server (uvicorn on a free port, SmolLM2)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from agent.config import SettingsError, load_settings
from agent.engine.base import Engine
from agent.serving.api.auth import COOKIE_NAME, ApiKeys, path_is_public
from agent.serving.api.principals import (
    ForbiddenError,
    KeyRing,
    KeysFileError,
    Principal,
    Role,
    load_keys_file,
)
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


# --- principals and roles (API_KEYS_FILE) ------------------------------------------------------------------------

ALICE, BOB, ROOT = "alice-key-1", "bob-key-2", "root-key-3"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_toml(**limits: int) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in limits.items())
    return (
        f'[[keys]]\nname = "alice"\nrole = "learner"\nsha256 = "{sha(ALICE)}"\n{extra}\n'
        f'[[keys]]\nname = "bob"\nrole = "learner"\nsha256 = "{sha(BOB)}"\n\n'
        f'[[keys]]\nname = "root"\nrole = "admin"\nsha256 = "{sha(ROOT)}"\n'
    )


def test_keys_file_names_principals_and_roles(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(max_concurrent=2, tokens_per_minute=500))
    ring = KeyRing.build([KEY], path)
    alice, root, operator = ring.lookup(ALICE), ring.lookup(ROOT), ring.lookup(KEY)
    assert alice == Principal("alice", Role.learner, max_concurrent=2, tokens_per_minute=500)
    assert root is not None and root.is_admin and root.name == "root"
    assert operator is not None and operator.is_admin and operator.name == "local"  # API_KEYS keys stay admins
    assert ring.lookup(sha(ALICE)) is None and ring.lookup("nope") is None  # the digest itself is not a key
    assert alice.default_session("default") == "default:alice" and operator.default_session("default") == "default"
    with pytest.raises(ForbiddenError, match="needs the admin role; 'alice' is a learner"):
        alice.require(Role.admin, "POST /load_model")


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('[[keys]]\nname = "a"\nrole = "teacher"\nsha256 = "{h}"\n', 3, "unknown role 'teacher'"),
        ('[[keys]]\nname = "a"\nrole = "learner"\nsha256 = "not-hex"\n', 4, "64 hex digits"),
        ('[[keys]]\nname = "a"\nrole = "learner"\n', 1, "`sha256` is required"),
        (
            '[[keys]]\nname = "a"\nrole = "learner"\nsha256 = "{h}"\n\n[[keys]]\nname = "a"\nrole = "admin"\n'
            'sha256 = "{h}"\n',
            7,
            "appears twice",
        ),  # fmt: skip
        ('[[keys]]\nname = "a b"\nrole = "learner"\nsha256 = "{h}"\n', 2, "name 'a b'"),
        ('[[keys]]\nname = "a"\nrole = "learner"\nsha256 = "{h}"\nmax_concurrent = -1\n', 5, "max_concurrent"),
        ('[[keys]]\nname = "a"\nrole = "learner"\nsha256 = "{h}"\ncolour = "red"\n', 5, "unknown field 'colour'"),
        ('[[keys]]\nname = "a"\nrole = learner\n', 3, "not valid TOML"),
        ('[[keys]]\nname = "local"\nrole = "admin"\nsha256 = "{h}"\n', 2, "reserved"),
    ],
)
def test_malformed_keys_file_names_file_and_line(tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text.replace("{h}", sha("k")))
    with pytest.raises(KeysFileError) as failed:
        load_keys_file(path)
    assert f"{path}:{line}:" in str(failed.value) and problem in str(failed.value)


def test_bad_keys_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "a"\nrole = "superuser"\nsha256 = "00"\n')
    with pytest.raises(KeysFileError, match=r"keys\.toml:3: .*unknown role 'superuser'"):
        create_app(load_settings(history_db=tmp_path / "h.sqlite3", api_keys_file=path))
    with pytest.raises(KeysFileError, match="cannot read"):
        create_app(load_settings(history_db=tmp_path / "h.sqlite3", api_keys_file=tmp_path / "missing.toml"))


@contextlib.asynccontextmanager
async def principals_server(engine: Engine, tmp_path: Path, **overrides: object) -> AsyncIterator[str]:
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(**overrides.pop("alice_limits", {})))
    overrides = {"max_new_tokens": 4, "temperature": 0.0, **overrides}
    settings = load_settings(history_db=tmp_path / "h.sqlite3", api_keys=KEY, api_keys_file=path, **overrides)
    async with serving(create_app(settings, engine)) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.slow
async def test_learners_see_only_their_own_sessions_and_usage(smollm_engine: Engine, tmp_path: Path) -> None:
    async with principals_server(smollm_engine, tmp_path) as url, httpx.AsyncClient(base_url=url, timeout=120) as c:
        alice, bob, root = bearer(ALICE), bearer(BOB), bearer(ROOT)
        # the seed's /chat without session_id: each caller's own default session
        first = await c.post("/chat", headers=alice, json={"message": "What is a stack?"})
        assert first.status_code == 200 and first.json()["session_id"] == "default:alice"
        other = await c.post("/chat", headers=bob, json={"message": "What is a queue?"})
        assert other.json()["session_id"] == "default:bob"
        assert [t["content"] for t in (await c.get("/history", headers=alice)).json()["history"]][0] == (
            "What is a stack?"
        )
        bobs = (await c.post("/sessions", headers=bob)).json()["session_id"]
        listed = {s["session_id"] for s in (await c.get("/sessions", headers=alice)).json()["sessions"]}
        assert listed == {"default:alice"}
        # another learner's session: 404, exactly like a session that does not exist
        for session in (bobs, "default:bob"):
            for response in (
                await c.get("/history", headers=alice, params={"session_id": session}),
                await c.post("/clear_history", headers=alice, json={"session_id": session}),
                await c.delete(f"/sessions/{session}", headers=alice),
                await c.post("/chat", headers=alice, json={"message": "hi", "session_id": session}),
            ):
                assert response.status_code == 404, response.text
                assert (
                    response.json()["error"]["message"]
                    == f"session {session!r} not found: create one with POST /sessions"
                )
        assert len((await c.get("/history", headers=bob, params={"session_id": "default:bob"})).json()["history"]) == 2
        # admin routes: 403 naming the role
        refused = await c.post("/load_model", headers=alice, json={"dtype": "no-such-dtype"})
        assert refused.status_code == 403 and "needs the admin role" in refused.json()["error"]["message"]
        assert (await c.get("/sessions", headers=alice, params={"all": "true"})).status_code == 403
        assert (await c.get("/usage", headers=alice, params={"principal": "bob"})).status_code == 403
        assert (await c.post("/load_model", headers=root, json={"dtype": "no-such-dtype"})).status_code == 422
        # admins: everything
        everyone = (await c.get("/sessions", headers=root, params={"all": "true"})).json()["sessions"]
        assert {(s["session_id"], s["owner"]) for s in everyone} >= {("default:alice", "alice"), (bobs, "bob")}
        assert (await c.get("/history", headers=root, params={"session_id": "default:alice"})).status_code == 200
        # usage: per principal and day, in the store
        mine = (await c.get("/usage", headers=alice)).json()["usage"]
        assert [(r["principal"], r["role"], r["requests"]) for r in mine] == [("alice", "learner", 1)]
        assert mine[0]["prompt_tokens"] > 0 and 0 < mine[0]["completion_tokens"] <= 4
        assert {r["principal"] for r in (await c.get("/usage", headers=root)).json()["usage"]} == {"alice", "bob"}
        assert (await c.get("/me", headers=alice)).json() == {
            "name": "alice", "role": "learner", "max_concurrent": 0, "tokens_per_minute": 0,
        }  # fmt: skip
        metrics = (await c.get("/metrics")).text
        assert 'dsa_principal_requests_total{role="learner"} 2.0' in metrics
        # the web UI: after /login, the browser's cookie is alice's principal
        login = await c.post("/login", data={"key": ALICE}, headers={"Origin": url})
        assert login.status_code == 303
        assert [s["session_id"] for s in (await c.get("/sessions")).json()["sessions"]] == ["default:alice"]


@pytest.mark.slow
async def test_per_principal_limits_answer_429(smollm_engine: Engine, tmp_path: Path) -> None:
    limits = {"alice_limits": {"tokens_per_minute": 1}, "principal_max_concurrent": 1, "max_new_tokens": 64}
    short = {"message": "hi", "max_new_tokens": 2}
    async with (
        principals_server(smollm_engine, tmp_path, **limits) as url,
        httpx.AsyncClient(base_url=url, timeout=120) as c,
    ):
        body = {"message": "Say something long about trees.", "max_new_tokens": 64, "stream": True}
        # bob: one request at a time (PRINCIPAL_MAX_CONCURRENT=1); alice's own limit is tokens per minute
        async with c.stream("POST", "/chat", headers=bearer(BOB), json=body) as streaming:
            assert streaming.status_code == 200
            second = await c.post("/chat", headers=bearer(BOB), json=short)
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            assert "PRINCIPAL_MAX_CONCURRENT" in second.json()["error"]["message"]
            assert (await c.post("/chat", headers=bearer(ROOT), json=short)).status_code == 200  # per principal
        # the stream was cut (client gone): its slot comes back
        for _ in range(100):
            again = await c.post("/chat", headers=bearer(BOB), json=short)
            if again.status_code != 429:
                break
            await asyncio.sleep(0.1)
        assert again.status_code == 200, again.text
        assert (await c.post("/chat", headers=bearer(ALICE), json=short)).status_code == 200
        messages = [{"role": "user", "content": "hi"}]
        over = await c.post("/v1/chat/completions", headers=bearer(ALICE), json={"messages": messages, "max_tokens": 2})
        assert over.status_code == 429 and 1 <= int(over.headers["retry-after"]) <= 60
        assert over.json()["error"]["type"] == "rate_limited"
        assert 'dsa_principal_limited_total{limit="concurrent",role="learner"} 1.0' in (await c.get("/metrics")).text
