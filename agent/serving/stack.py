"""`dsa-agent up` (what `make run` does): Triton with the model, then FastAPI in gateway mode in front of it.

One model copy serves both doors: Triton loads the engine chosen by LOADING_STRATEGY (auto, transformers, vllm, onnx)
and FastAPI runs with LOADING_STRATEGY=triton, its engine a gRPC-streaming client of that Triton
(agent.serving.triton.gateway). Ctrl-C / SIGTERM stops both; if either exits, the other is stopped too.

Stopping drains both doors at once for up to GRACEFUL_SHUTDOWN_SECONDS: FastAPI stops accepting and finishes its
streams, Triton's model refuses new requests and finishes (then cancels) its in-flight ones; with nothing in flight
the stack is down in a few seconds. FastAPI runs in its own process group, so a terminal's Ctrl-C reaches it once
(through us): a second SIGINT would make uvicorn exit at once instead of draining.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from agent.config import LoadingStrategy, load_settings
from agent.serving.triton.launcher import TritonConfig, TritonLaunchError, TritonServer

log = logging.getLogger(__name__)


def triton_env() -> dict[str, str]:
    """Triton's engine settings: the environment, except a LOADING_STRATEGY=triton meant for FastAPI (-> auto)."""
    env = {}
    if os.environ.get("LOADING_STRATEGY", "").strip().lower() == LoadingStrategy.triton.value:
        env["LOADING_STRATEGY"] = LoadingStrategy.auto.value
    return env


def fastapi_command(argv: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "serve", *argv]


def fastapi_env(cfg: TritonConfig) -> dict[str, str]:
    """FastAPI in gateway mode, pointed at the Triton we started."""
    env = dict(os.environ)
    env.update(
        LOADING_STRATEGY=LoadingStrategy.triton.value,
        TRITON_GRPC_URL=cfg.grpc_url,
        TRITON_HTTP_URL=cfg.http_url,
        TRITON_METRICS_PORT=str(cfg.metrics_port),
    )
    return env


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dsa-agent up", description="Start Triton (:8001/:8002/:8003) and FastAPI (:8000) in gateway mode."
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for Triton's model")
    # Every other argument goes to `dsa-agent serve` (e.g. --port 8000 --host 0.0.0.0).
    args, serve_args = parser.parse_known_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    load_settings()  # a bad environment stops here, with every bad variable named, before anything starts

    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    cfg = TritonConfig.from_settings()
    cfg.extra_env = triton_env()
    triton = TritonServer(cfg)
    fastapi: subprocess.Popen[bytes] | None = None
    try:
        log.info("starting Triton (the model loads inside it; this can take a minute) ...")
        triton.start(args.timeout)
        log.info("starting FastAPI in gateway mode -> Triton gRPC %s", cfg.grpc_url)
        fastapi = subprocess.Popen(fastapi_command(serve_args), env=fastapi_env(cfg), start_new_session=True)
        while not stopping and fastapi.poll() is None and triton.process is not None and triton.process.poll() is None:
            time.sleep(0.5)
        return 0 if stopping else 1
    except TritonLaunchError as exc:
        log.error("%s", exc)
        return 1
    finally:
        triton.begin_drain()  # both doors drain at the same time
        if fastapi is not None:
            stop_fastapi(fastapi, load_settings().graceful_shutdown_seconds)
        triton.stop()
        log.info("stopped")


def stop_fastapi(fastapi: subprocess.Popen[bytes], grace: float) -> None:
    """SIGINT (uvicorn's graceful shutdown: it drains for up to `grace` s), then end its whole process group."""
    if fastapi.poll() is None:
        fastapi.send_signal(signal.SIGINT)
        try:  # FastAPI drains in-flight answers for up to GRACEFUL_SHUTDOWN_SECONDS: wait a little longer
            fastapi.wait(grace + 15)
        except subprocess.TimeoutExpired:
            log.warning("FastAPI did not stop in %.0f s: killing it", grace + 15)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(fastapi.pid, signal.SIGKILL)  # anything it started; normally nothing is left
    fastapi.wait()
