"""Real Prometheus (Debian's) with the project's scrape config (targets rewritten to the live stack's ports): both
doors are `up`, and every query of the Grafana dashboard returns series once traffic has flowed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from deploy_helpers import (
    LiveStack,
    dashboard_queries,
    free_port,
    require_tool,
    stop_process,
    template_prometheus,
    wait_http,
)

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.triton]


@pytest.fixture(scope="module")
def prometheus_url(live_stack: LiveStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("prometheus")
    conf = tmp / "prometheus.yml"
    conf.write_text(template_prometheus(live_stack.fastapi, live_stack.triton_metrics))
    listen = f"127.0.0.1:{free_port()}"
    log = tmp / "prometheus.log"
    cmd = [
        require_tool("prometheus"),
        f"--config.file={conf}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address={listen}",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://{listen}/-/ready", 60, proc, log)
        yield f"http://{listen}"
    finally:
        stop_process(proc)


def make_traffic(fastapi: str) -> None:
    """What the dashboard shows: answers (plain and streamed, through Triton) and a refused request."""
    base = f"http://{fastapi}"
    for stream in (False, True):
        payload = {"message": "Name a sorting algorithm.", "stream": stream, "temperature": 0, "max_new_tokens": 8}
        response = httpx.post(f"{base}/chat", json=payload, timeout=120)
        assert response.status_code == 200, response.text
    assert httpx.post(f"{base}/chat", json={"message": 42}, timeout=30).status_code in (400, 422)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"{what} (last answer: {last!r})")


def test_both_targets_up(prometheus_url: str) -> None:
    def targets() -> dict[str, str] | None:
        active = httpx.get(f"{prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in active}
        return health if health == {"fastapi": "up", "triton": "up"} else None

    wait_for(targets, 30, "both scrape targets up")


def test_every_dashboard_query_returns_series(prometheus_url: str, live_stack: LiveStack) -> None:
    make_traffic(live_stack.fastapi)

    def query(expr: str) -> list:
        answer = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    # rate() needs two scrapes after the traffic: poll each query until it has series.
    for title, expr in dashboard_queries():
        wait_for(lambda expr=expr: query(expr), 30, f"panel {title!r}: no series for {expr}")
