"""The live stack of the deploy tests: real Triton (python backend, SmolLM2) and FastAPI in gateway mode, as
docker-compose runs them, on free 127.0.0.1 ports. Started once per session, only by the tests that need it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import ROOT, LiveStack, clean_env, free_port, stop_process, wait_http


@pytest.fixture(scope="session")
def live_stack(smollm_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    from agent.serving.triton.launcher import TritonConfig, TritonServer

    logs = tmp_path_factory.mktemp("deploy-live")
    # The compose file's model settings, made light for a CPU test: SmolLM2 in fp32 on the transformers engine.
    model_env = {
        "MODEL_PATH": str(smollm_folder),
        "LOADING_STRATEGY": "transformers",
        "QUANTIZATION_TYPE": "none",
        "DTYPE": "float32",
        "MAX_NEW_TOKENS": "16",
        "MAX_BATCH_SIZE": "8",
    }
    http, grpc, metrics = free_port(), free_port(), free_port()
    cfg = TritonConfig(http_port=http, grpc_port=grpc, metrics_port=metrics, extra_env=model_env)
    triton = TritonServer(cfg, log_path=logs / "triton.log")
    triton.start(timeout=300)
    fastapi_port = free_port()
    env = clean_env() | {
        "LOADING_STRATEGY": "triton",  # docker-compose.yml's fastapi-server
        "TRITON_GRPC_URL": cfg.grpc_url,
        "TRITON_HTTP_URL": cfg.http_url,
        "TRITON_METRICS_PORT": str(metrics),
        "HOST": "127.0.0.1",
        "PORT": str(fastapi_port),
        "HISTORY_DB": str(logs / "history.sqlite3"),
        "MAX_NEW_TOKENS": "16",
    }
    fastapi_log = logs / "fastapi.log"
    with open(fastapi_log, "wb") as out:
        fastapi = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_http(f"http://127.0.0.1:{fastapi_port}/health", 180, fastapi, fastapi_log)
        yield LiveStack(f"127.0.0.1:{fastapi_port}", cfg.http_url, f"127.0.0.1:{metrics}", logs)
    finally:
        stop_process(fastapi)
        triton.stop()
