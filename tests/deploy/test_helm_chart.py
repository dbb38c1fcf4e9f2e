"""The Helm chart: renders (helm-python-sdk = Helm v4's library), lints strictly, and its manifests validate against
the Kubernetes schemas offline (kubernetes-validate --strict, the chart's oldest and the newest Kubernetes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import HELM_CHART, INSTALL_HINT, require_tool, run_tool

from agent.config import Settings

pytestmark = pytest.mark.deploy

VARIANTS = {
    "defaults": {},
    "cpu-only-no-autoscaling": {"triton": {"gpus": 0, "autoscaling": {"enabled": False}, "replicaCount": 2}},
    "weights-pvc-no-persistence": {
        "weights": {"persistentVolumeClaim": {"claimName": "qwen3-vl-8b"}},
        "model": {"path": "/weights/Qwen3-VL-8B-Instruct"},
        "fastapi": {"history": {"persistence": False}},
        "extraEnv": [{"name": "MAX_QUEUE", "value": "512"}],
    },
    "postgres": {"fastapi": {"postgres": {"urlSecret": {"name": "newbie-db"}}}},
    "postgres-fixed-replicas": {
        "fastapi": {"postgres": {"urlSecret": {"name": "newbie-db"}}, "autoscaling": {"enabled": False}},
    },
}
KUBE_VERSIONS = ("1.25.0", "1.37.0")  # Chart.yaml's kubeVersion floor, and the newest schemas bundled


def _helm():
    try:
        import helm_python
    except ImportError:
        pytest.fail(f"helm-python-sdk is not installed: {INSTALL_HINT}", pytrace=False)
    return helm_python


def render(values: dict | None = None) -> list[dict]:
    """The chart's manifests for `values` (release `demo`), parsed."""
    manifests = _helm().Chart.load(HELM_CHART).render(values or {}, name="demo", namespace="ai", is_install=True)
    docs = []
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str, component: str) -> dict:
    found = [
        d for d in docs if d["kind"] == kind and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(found) == 1, f"{kind}/{component}: {len(found)} found"
    return found[0]


def container(docs: list[dict], component: str) -> dict:
    return by_kind(docs, "Deployment", component)["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_validates_against_kubernetes_schemas(variant: str, tmp_path: Path) -> None:
    docs = render(VARIANTS[variant])
    assert {d["kind"] for d in docs} >= {"Deployment", "Service"}
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    for version in KUBE_VERSIONS:
        proc = run_tool([require_tool("kubernetes-validate"), "--strict", "-k", version, str(path)])
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validator_rejects_an_invalid_manifest(tmp_path: Path) -> None:
    docs = render()
    container(docs, "triton")["startupProbes"] = container(docs, "triton").pop("startupProbe")  # a typo
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = run_tool([require_tool("kubernetes-validate"), "--strict", str(path)])
    assert proc.returncode != 0 and "startupProbes" in proc.stdout + proc.stderr


def test_lint_strict_is_clean() -> None:
    report = _helm().lint(HELM_CHART, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 2 = warning, 3 = error


def test_triton_probes_shm_and_gpus() -> None:
    docs = render()
    triton = container(docs, "triton")
    startup = triton["startupProbe"]
    # Loading an 8B model (and vLLM's start) takes minutes: the startup probe must outlast it.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    spec = by_kind(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    assert "--model-control-mode=explicit" in triton["args"] and "--load-model=qwen3-vl" in triton["args"]
    cpu_only = container(render(VARIANTS["cpu-only-no-autoscaling"]), "triton")
    assert "nvidia.com/gpu" not in cpu_only["resources"]["limits"]


def test_fastapi_gateway_readiness_and_history() -> None:
    docs = render()
    fastapi = container(docs, "fastapi")
    env = {e["name"]: e.get("value") for e in fastapi["env"]}
    triton_service = by_kind(docs, "Service", "triton")
    grpc_port = next(p["port"] for p in triton_service["spec"]["ports"] if p["name"] == "grpc")
    assert env["LOADING_STRATEGY"] == "triton"
    assert env["TRITON_GRPC_URL"] == f"{triton_service['metadata']['name']}:{grpc_port}"
    assert fastapi["readinessProbe"]["httpGet"]["path"] == "/health"
    assert any(m["mountPath"] == str(Path(env["HISTORY_DB"]).parent) for m in fastapi["volumeMounts"])
    assert by_kind(docs, "PersistentVolumeClaim", "fastapi")


def test_both_doors_get_the_seed_table_with_settings_defaults() -> None:
    docs = render()
    for component in ("triton", "fastapi"):
        env = {e["name"]: e.get("value") for e in container(docs, component)["env"]}
        for key in ("MODEL_PATH", "QUANTIZATION_TYPE", "ATTENTION_IMPL", "MAX_HISTORY", "MAX_NEW_TOKENS"):
            field = key.lower()
            assert getattr(Settings(**{field: env[key]}), field) == Settings.model_fields[field].default, key
        for key in ("TEMPERATURE", "TOP_P"):
            assert float(env[key]) == Settings.model_fields[key.lower()].default


def test_fastapi_with_postgres_is_replicated_with_pdb_and_hpa() -> None:
    docs = render(VARIANTS["postgres"])
    deployment = by_kind(docs, "Deployment", "fastapi")
    assert "replicas" not in deployment["spec"] and deployment["spec"].get("strategy") is None  # the HPA owns it
    env = {e["name"]: e for e in container(docs, "fastapi")["env"]}
    assert env["HISTORY_DB"]["valueFrom"]["secretKeyRef"] == {"name": "newbie-db", "key": "url"}
    assert not [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "history"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    pdb = by_kind(docs, "PodDisruptionBudget", "fastapi")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = by_kind(docs, "HorizontalPodAutoscaler", "fastapi")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    fixed = render(VARIANTS["postgres-fixed-replicas"])
    assert by_kind(fixed, "Deployment", "fastapi")["spec"]["replicas"] == 2
    assert not [d for d in fixed if d["kind"] == "HorizontalPodAutoscaler" and "fastapi" in d["metadata"]["name"]]
    # SQLite (the default): one replica, no PDB, no FastAPI HPA
    default = render()
    assert by_kind(default, "Deployment", "fastapi")["spec"]["replicas"] == 1
    assert not [d for d in default if d["kind"] == "PodDisruptionBudget"]


def test_autoscaler_on_queue_time() -> None:
    docs = render()
    hpa = by_kind(docs, "HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind(docs, "Deployment", "triton")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and "queue" in metric["pods"]["metric"]["name"]
    assert "replicas" not in by_kind(docs, "Deployment", "triton")["spec"]  # the HPA owns the count
    off = render(VARIANTS["cpu-only-no-autoscaling"])
    assert not [d for d in off if d["kind"] == "HorizontalPodAutoscaler"]
    assert by_kind(off, "Deployment", "triton")["spec"]["replicas"] == 2


def undocumented_values(text: str) -> list[str]:
    """Keys of a values.yaml without documentation: a comment right above the key, or its parent's, or (for a run of
    siblings with no blank line between, e.g. nodeSelector/tolerations/affinity) the first sibling's."""
    missing: list[str] = []
    documented: dict[int, bool] = {}  # indent -> whether the last key at that indent was documented
    previous = ""  # the previous line ("" after a blank one)
    for line in text.splitlines():
        key = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if key:
            indent = len(key.group(1))
            parent = max((i for i in documented if i < indent), default=None)
            ok = previous.lstrip().startswith("#") or (parent is not None and documented[parent])
            ok = ok or (bool(previous) and documented.get(indent, False))
            if not ok:
                missing.append(key.group(2))
            documented = {i: d for i, d in documented.items() if i < indent} | {indent: ok}
        previous = line if line.strip() else ""
    return missing


def test_every_value_is_documented() -> None:
    text = (HELM_CHART / "values.yaml").read_text()
    assert undocumented_values(text) == []
    assert undocumented_values(text + "\nundocumented: 1\n") == ["undocumented"]
