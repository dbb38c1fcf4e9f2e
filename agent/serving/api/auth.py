"""Optional API keys for the FastAPI door (API_KEYS), checked in constant time, and the web UI's key page.

With keys set, every request needs `Authorization: Bearer <key>` except:
- PUBLIC_PATHS (default `/health`, `/metrics`: probes and Prometheus scrape without a key);
- the web UI's static files (scripts, styles, icons hold no data). The page itself (`/`, `/index.html`) redirects a
  browser without a key to `/login`, a small form that stores the key in an HttpOnly, SameSite=Strict cookie; the
  page's own `fetch` calls then carry it, so the UI works unchanged. The cookie is accepted like the Bearer header.
  SameSite=Strict keeps other sites from sending it, and JSON-only bodies keep cross-site forms out (docs/api.md).

A refused request gets 401 `unauthorized` in the usual JSON error shape with `WWW-Authenticate: Bearer`. Keys are
compared as SHA-256 digests with `hmac.compare_digest` against every configured key, so neither the timing nor the
number of comparisons depends on how much of a guess was right.

Each key belongs to a principal (agent.serving.api.principals: API_KEYS are admins, API_KEYS_FILE names learners
and admins); the middleware puts the caller's principal in the request's state (`request.state.principal`), read
by the routes through `PrincipalDep`. Without any key configured the caller is the one local admin.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from fastapi import Depends, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from agent.engine.errors import EngineError
from agent.serving.api.errors import engine_error_payload
from agent.serving.api.principals import ANONYMOUS, LOCAL_ADMIN, KeyRing, Principal, Role, digest

log = logging.getLogger(__name__)

COOKIE_NAME = "newbie_api_key"
COOKIE_MAX_AGE = 30 * 24 * 3600  # s: a browser is asked again after a month
LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
MAX_LOGIN_BODY = 4096  # bytes: a login form holds one key
_INDEX_PATHS = ("/", "/index.html")


class UnauthorizedError(EngineError):
    """A route that needs an API key was called without a valid one."""

    status, code = 401, "unauthorized"


class ApiKeys(KeyRing):
    """Plain keys (API_KEYS), all admins of the principal `local`; `check` compares in constant time."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__([(digest(k), LOCAL_ADMIN) for k in keys if k])


def get_principal(request: Request) -> Principal:
    """The caller (set by `AuthMiddleware`; the local admin when no key is configured)."""
    return getattr(request.state, "principal", LOCAL_ADMIN)


def get_admin(request: Request) -> Principal:
    """The caller, who must be an admin (403 naming the role otherwise)."""
    principal = get_principal(request)
    principal.require(Role.admin, f"{request.method} {request.url.path}")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]


def path_is_public(path: str, public_paths: Sequence[str]) -> bool:
    """`path` is listed in PUBLIC_PATHS exactly, or under an entry ending in `*`."""
    for entry in public_paths:
        if entry.endswith("*"):
            if path.startswith(entry[:-1]):
                return True
        elif path == entry:
            return True
    return False


class AuthMiddleware:
    """Refuse requests without a valid key (see the module docstring); serve /login and /logout."""

    def __init__(self, app: ASGIApp, keys: KeyRing, public_paths: Sequence[str], web_dir: Path | None) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = tuple(public_paths)
        self.web_dir = web_dir.resolve() if web_dir is not None and web_dir.is_dir() else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.keys.enabled:
            scope.setdefault("state", {})["principal"] = LOCAL_ADMIN
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == LOGIN_PATH:
            response = await self._login(scope, receive) if method == "POST" else _login_page()
            await response(scope, receive, send)
            return
        if path == LOGOUT_PATH and method == "POST":
            response = RedirectResponse("login", status_code=303)
            response.delete_cookie(COOKIE_NAME, path="/")
            await response(scope, receive, send)
            return
        principal = self._principal(scope)
        if principal is not None or path_is_public(path, self.public_paths):
            scope.setdefault("state", {})["principal"] = principal or ANONYMOUS
            await self.app(scope, receive, send)
            return
        if method in ("GET", "HEAD") and self._is_web_asset(path):
            if path in _INDEX_PATHS:  # the page: ask for a key first, then its fetch calls carry the cookie
                await RedirectResponse("login", status_code=303)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        await _unauthorized()(scope, receive, send)

    def _principal(self, scope: Scope) -> Principal | None:
        header, cookie = None, None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                header = token.strip() if scheme.lower() == "bearer" else None
            elif name == b"cookie":
                morsel = SimpleCookie(value.decode("latin-1")).get(COOKIE_NAME)
                cookie = morsel.value if morsel is not None else cookie
        # Both are checked: a stale cookie must not hide a valid header (or the reverse); the header wins.
        from_header, from_cookie = self.keys.lookup(header), self.keys.lookup(cookie)
        return from_header or from_cookie

    def _is_web_asset(self, path: str) -> bool:
        if self.web_dir is None:
            return False
        if path in _INDEX_PATHS:
            return True
        target = (self.web_dir / path.lstrip("/")).resolve()
        return target.is_file() and target.is_relative_to(self.web_dir)

    async def _login(self, scope: Scope, receive: Receive) -> Response:
        if not _same_origin(scope):
            return _login_page("This form only accepts posts from its own page.", status=403)
        body = await _read_body(receive, MAX_LOGIN_BODY)
        key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0].strip() if body is not None else ""
        if not self.keys.check(key):
            client = (scope.get("client") or ("?", 0))[0]
            log.warning("login with a wrong API key from %s", client)
            return _login_page("That key is not valid.", status=401)
        response = RedirectResponse("./", status_code=303)
        response.set_cookie(
            COOKIE_NAME, key, max_age=COOKIE_MAX_AGE, path="/", httponly=True, samesite="strict",
            secure=scope.get("scheme") == "https",
        )  # fmt: skip
        return response


def _unauthorized() -> JSONResponse:
    exc = UnauthorizedError("missing or invalid API key: send the header 'Authorization: Bearer <key>'")
    return JSONResponse(engine_error_payload(exc), status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _same_origin(scope: Scope) -> bool:
    """A browser's post carries Origin: refuse one from another site (login CSRF). No Origin: not a browser form."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
    origin = headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == headers.get("host", "")


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None if it is larger than `limit`."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _login_page(error: str = "", status: int = 200) -> HTMLResponse:
    note = f'<p class="error">{html.escape(error)}</p>' if error else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>newbie-app: API key</title>
<style>body{{font:16px system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}}
input{{font:inherit;width:100%;padding:.5rem;margin:.5rem 0;box-sizing:border-box}}.error{{color:#b00020}}</style>
</head><body><h1>API key</h1><p>This server needs an API key. It is kept in this browser only.</p>{note}
<form method="post" action="login"><label for="key">Key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<input type="submit" value="Continue"></form></body></html>"""
    return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})
