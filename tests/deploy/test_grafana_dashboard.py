"""The provisioned Grafana dashboard: structure, the panels the issue asks for, valid PromQL on known metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DASHBOARD, ROOT, dashboard_queries, require_tool, run_tool

pytestmark = pytest.mark.deploy

REQUIRED_PANELS = {
    "Request rate",
    "Errors",
    "Time to first token",
    "Inter-token latency",
    "Tokens per second",
    "Queue time",
    "Running and waiting requests",
}
# Metric families the queries may use: docs/api.md (FastAPI), the model's dsa_triton_* and Triton's own.
TRITON_CUSTOM = {
    "dsa_triton_generated_tokens_total",
    "dsa_triton_time_to_first_token_seconds",
    "dsa_triton_inter_token_latency_seconds",
    "dsa_triton_running_requests",
}
TRITON_BUILTIN = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_queue_duration_us",
    "nv_inference_pending_request_count",
}


def _api_md_metrics() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    section = text[text.index("### Metrics") :]
    return {m.split("{")[0] for m in re.findall(r"`(dsa_[a-z_]+)(?:\{[^`]*\})?`", section)}


def _metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\b(?=\s*[\[{)])", expr))
    names = {w for w in words if w.startswith(("dsa_", "nv_")) or w == "up"}
    return {re.sub(r"_bucket$", "", n) for n in names}


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {p["title"] for p in dash["panels"]} >= REQUIRED_PANELS
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"] and target["refId"]


def test_provisioning_points_at_the_dashboards_mount() -> None:
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/newbie-app.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose


def test_queries_use_known_metrics_of_both_doors() -> None:
    known = _api_md_metrics() | {"dsa_requests_total", "dsa_generated_tokens_total", "dsa_prompt_tokens_total"}
    known |= TRITON_CUSTOM | TRITON_BUILTIN | {"up"}
    used: set[str] = set()
    for title, expr in dashboard_queries():
        names = _metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= known, f"{title}: unknown metrics {names - known}"
        used |= names
    # Each door shows up: FastAPI's docs/api.md metrics and the Triton model's custom metrics.
    assert {"dsa_time_to_first_token_seconds", "dsa_inter_token_latency_seconds", "dsa_queue_seconds"} <= used
    assert used >= TRITON_CUSTOM


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses every query as a recording rule: a syntax error in any panel fails here.
    rules = [{"record": f"q{i}:check", "expr": expr} for i, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run_tool([require_tool("promtool"), "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = [{"record": "a:b", "expr": "sum(rate(x[5m])"}]  # one parenthesis missing
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": broken}]}))
    assert run_tool([require_tool("promtool"), "check", "rules", str(path)]).returncode != 0
