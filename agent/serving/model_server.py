"""The FastAPI door (:8000): the seed's REST routes, sessions, OpenAI-compatible routes, /metrics and the web UI.

`create_app()` builds the app; its lifespan opens the history store and starts loading the model in the background,
so `/health` answers 503 `{"status": "loading"}` until the model is ready. `dsa-agent serve` runs it with uvicorn.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from agent.config import Settings, get_settings, load_settings
from agent.engine.base import Engine
from agent.serving.api import metrics as metrics_routes
from agent.serving.api import routes_openai, routes_seed, routes_sessions, routes_usage
from agent.serving.api.auth import AuthMiddleware
from agent.serving.api.body_limit import BodyLimitMiddleware
from agent.serving.api.engine_runner import EngineRunner, Loader
from agent.serving.api.errors import RequestContextMiddleware, install_error_handlers
from agent.serving.api.metrics import Metrics, MetricsMiddleware
from agent.serving.api.principals import KeyRing
from agent.serving.api.quotas import PrincipalLimits, PrincipalMetrics
from agent.serving.api.store import open_store
from agent.serving.inference_engine import ChatService

log = logging.getLogger(__name__)

WEB_UI_DIR = Path(__file__).resolve().parent.parent / "client" / "web" / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

DESCRIPTION = """Self-hosted vision-language chat server (the seed's "original FastAPI server").

Errors have one JSON shape: `{"error": {"message", "type", "code", "param"}}`; 429 and 503 carry `Retry-After`.
"""


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, *, loader: Loader | None = None
) -> FastAPI:
    """The FastAPI app.

    `engine`: an already started engine to serve (tests inject `FakeEngine` or a shared real engine); the app then
    skips loading and never shuts it down. Otherwise the model in `settings` is loaded in the background with
    `loader` (default `agent.serving.model_loader.load_engine`), which `/load_model` also uses.
    """
    settings = settings or get_settings()
    metrics = Metrics()
    principal_metrics = PrincipalMetrics(metrics.registry)
    # Built now, not in the lifespan: a bad API_KEYS_FILE stops start-up before anything is served.
    keys = KeyRing.build(settings.api_key_list, settings.api_keys_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # PostgreSQL: retried for STORE_CONNECT_TIMEOUT, then start-up fails naming the URL (password redacted).
        store = await open_store(
            settings.history_db, connect_timeout=settings.store_connect_timeout, pool_size=settings.store_pool_size
        )
        runner = EngineRunner(settings, engine=engine, loader=loader, observer=metrics)
        metrics.bind(runner.admission)
        quotas = PrincipalLimits(store, settings, principal_metrics)
        app.state.service = ChatService(settings, store, runner, quotas)
        runner.start()
        try:
            yield
        finally:
            await runner.shutdown()
            await store.aclose()

    app = FastAPI(title="newbie-app", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    routers = (routes_seed.router, routes_sessions.router, routes_usage.router, routes_openai.router)
    for router in (*routers, metrics_routes.router):
        app.include_router(router)
    # add_middleware wraps: the last added runs first. Outermost: request id and 500s, metrics (401s and 413s are
    # counted), CORS (answers preflights, adds its headers to refusals too), keys (before any body is read), limits.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, keys=keys, public_paths=settings.public_paths, web_dir=WEB_UI_DIR)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestContextMiddleware)
    if WEB_UI_DIR.is_dir():  # after the API routes: "/" must not shadow them
        app.mount("/", StaticFiles(directory=WEB_UI_DIR, html=True), name="web")
    return app


def main(argv: list[str] | None = None) -> int:
    """`dsa-agent serve`: run the FastAPI door with uvicorn on HOST:PORT (flags override the environment)."""
    parser = argparse.ArgumentParser(prog="dsa-agent serve", description="Start the FastAPI door (:8000).")
    parser.add_argument("--host", help="bind address (default: HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: PORT, 8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = load_settings(**overrides)

    import uvicorn
    from sse_starlette.sse import AppStatus

    # sse-starlette ends every open stream as soon as SIGTERM arrives; we drain them instead, and uvicorn cancels
    # whatever is still running after GRACEFUL_SHUTDOWN_SECONDS (which aborts those engine requests).
    AppStatus.disable_automatic_graceful_drain()
    if not settings.api_key_list and settings.api_keys_file is None and settings.host not in LOOPBACK_HOSTS:
        log.warning("listening on %s without API keys: anyone who can reach this port can use it", settings.host)
    app = create_app(settings)  # a bad API_KEYS_FILE stops here, before anything listens
    log.info("FastAPI door on http://%s:%d (docs at /docs)", settings.host, settings.port)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
    )
    return 0
