"""deploy/prometheus/prometheus.yml: valid for promtool, scraping both doors at their compose addresses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from deploy_helpers import PROMETHEUS_CONF, compose_config, require_tool, run_tool

pytestmark = pytest.mark.deploy


def test_promtool_accepts_the_config() -> None:
    proc = run_tool([require_tool("promtool"), "check", "config", str(PROMETHEUS_CONF)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    bad = tmp_path / "prometheus.yml"
    bad.write_text(PROMETHEUS_CONF.read_text().replace("scrape_interval: 5s", "scrape_interval: fast"))
    assert run_tool([require_tool("promtool"), "check", "config", str(bad)]).returncode != 0


def test_targets_are_the_compose_services() -> None:
    jobs = {j["job_name"]: j for j in yaml.safe_load(PROMETHEUS_CONF.read_text())["scrape_configs"]}
    assert set(jobs) == {"fastapi", "triton"}
    services = compose_config()["services"]
    expected = {"fastapi": (("fastapi-server", "fastapi-server-2"), 8000), "triton": (("triton-server",), 8003)}
    for job, (names, port) in expected.items():
        assert jobs[job]["static_configs"][0]["targets"] == [f"{name}:{port}" for name in names]
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
        assert set(names) <= set(services)
