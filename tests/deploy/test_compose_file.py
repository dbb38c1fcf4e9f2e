"""docker-compose.yml, checked offline by the real Compose v2 loader and against the seed's and Settings' promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import COMPOSE_FILE, ROOT, clean_env, compose_binary, compose_config, run_tool

from agent.config import Settings

pytestmark = pytest.mark.deploy

SEED_ENV_TABLE = (
    "MODEL_PATH", "QUANTIZATION_TYPE", "ATTENTION_IMPL", "MAX_HISTORY", "MAX_NEW_TOKENS", "TEMPERATURE", "TOP_P",
)  # fmt: skip
# Values the containers set on purpose instead of the Settings default (where they listen, where state lives).
FASTAPI_VALUES = {
    "MODEL_CACHE_DIR": "/cache",
    "LOADING_STRATEGY": "triton",  # gateway mode: one model copy, in Triton
    "TRITON_GRPC_URL": "triton-server:8002",
    "TRITON_HTTP_URL": "triton-server:8001",
    "HOST": "0.0.0.0",
    # both replicas share the postgres service (sessions, history, usage, limits)
    "HISTORY_DB": "postgresql://newbie:newbie-change-me@postgres:5432/newbie",
}
CONTAINER_VALUES = {
    "triton-server": {"MODEL_CACHE_DIR": "/cache"},
    "fastapi-server": FASTAPI_VALUES,
    "fastapi-server-2": FASTAPI_VALUES,
}
# The seed's "Out of Memory" section, verbatim.
SEED_GPU_RESERVATION = [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config()


def _ports(service: dict) -> set[tuple[int, int]]:
    return {(int(p["published"]), int(p["target"])) for p in service.get("ports", [])}


def _mounts(service: dict) -> dict[str, dict]:
    return {v["target"]: v for v in service.get("volumes", [])}


def test_compose_quiet_validation_passes() -> None:
    proc = run_tool([compose_binary(), "-f", str(COMPOSE_FILE), "config", "-q"], env=clean_env())
    assert proc.returncode == 0, proc.stderr


def test_validator_rejects_a_misspelled_key(tmp_path: Path) -> None:
    # Proves the check above can fail: one misspelled key is a schema error for Compose.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("container_name: dsa-agent-triton", "contaner_name: x", 1))
    proc = run_tool([compose_binary(), "-f", str(broken), "config", "-q"], env=clean_env())
    assert proc.returncode != 0 and "contaner_name" in proc.stderr


def test_services_container_and_ports(compose: dict) -> None:
    services = compose["services"]
    assert {"fastapi-server", "triton-server", "nginx", "prometheus", "grafana"} <= set(services)
    triton, fastapi = services["triton-server"], services["fastapi-server"]
    assert triton["container_name"] == "dsa-agent-triton"  # the seed's `docker exec dsa-agent-triton ...`
    assert _ports(fastapi) == {(8000, 8000)}
    assert _ports(triton) == {(8001, 8001), (8002, 8002), (8003, 8003)}
    assert {target for _, target in _ports(services["nginx"])} == {80}
    # Triton inside the container listens where the ports point (its image's command).
    cmd = (ROOT / "agent/serving/triton-docker/Dockerfile.triton").read_text()
    for flag in ("--http-port=8001", "--grpc-port=8002", "--metrics-port=8003", "--model-repository=/models"):
        assert flag in cmd


def test_env_table_in_both_doors_with_settings_defaults(compose: dict) -> None:
    for name, expected in CONTAINER_VALUES.items():
        env = compose["services"][name]["environment"]
        assert set(SEED_ENV_TABLE) <= set(env), f"{name} lacks part of the seed's environment table"
        for key, value in env.items():
            field = key.lower()
            if field not in Settings.model_fields:
                continue
            if key in expected:
                assert value == expected[key], f"{name}: {key}={value!r}"
                continue
            # Parse the string as the app would; it must give exactly the Settings default.
            parsed = getattr(Settings(**{field: value}), field)
            assert parsed == Settings.model_fields[field].default, f"{name}: {key}={value!r} is not the default"


def test_environment_overrides_reach_the_containers() -> None:
    # The seed's "Update Configuration": a value set outside the file replaces the default in both doors.
    env = clean_env() | {"QUANTIZATION_TYPE": "int8", "MAX_NEW_TOKENS": "256"}
    services = compose_config(env=env)["services"]
    for name in ("triton-server", "fastapi-server"):
        assert services[name]["environment"]["QUANTIZATION_TYPE"] == "int8"
        assert services[name]["environment"]["MAX_NEW_TOKENS"] == "256"


def test_gpu_reservation_exactly_as_in_the_seed(compose: dict) -> None:
    devices = compose["services"]["triton-server"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == SEED_GPU_RESERVATION


def test_shm_size_healthchecks_and_start_order(compose: dict) -> None:
    services = compose["services"]
    # Compose normalises "2gb" to bytes; the python backend needs far more than Docker's 64 MB default.
    assert int(services["triton-server"]["shm_size"]) >= 1024**3
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    triton_check = services["triton-server"]["healthcheck"]
    assert "/v2/health/ready" in " ".join(triton_check["test"])
    assert triton_check["start_period"].startswith("15m"), "start period must outlast loading an 8B model"
    assert "/health" in " ".join(services["fastapi-server"]["healthcheck"]["test"])
    depends = services["fastapi-server"]["depends_on"]["triton-server"]
    assert depends["condition"] == "service_healthy"


def test_volumes_models_history_and_configs(compose: dict) -> None:
    services = compose["services"]
    triton = _mounts(services["triton-server"])
    assert Path(triton["/models"]["source"]) == ROOT / "agent/serving/triton-models"
    assert triton["/models"]["read_only"] is True
    assert (ROOT / "agent/serving/triton-models/qwen3-vl/1/model.py").is_file()
    for name in ("fastapi-server", "fastapi-server-2"):  # stateless: history is in the postgres service
        assert "@postgres:5432/" in services[name]["environment"]["HISTORY_DB"]
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    data = _mounts(services["postgres"])["/var/lib/postgresql/data"]
    assert data["type"] == "volume", "the history database must outlive the container"
    assert Path(_mounts(services["nginx"])["/etc/nginx/nginx.conf"]["source"]) == (
        ROOT / "agent/serving/triton-docker/nginx.conf"
    )
    prom = _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    assert Path(prom["source"]) == ROOT / "deploy/prometheus/prometheus.yml"
    for name, service in services.items():
        for mount in service.get("volumes", []):
            if mount["type"] == "bind" and mount["target"] != "/weights":  # /weights: the operator's checkpoints
                assert Path(mount["source"]).exists(), f"{name}: bind source {mount['source']} missing"


def test_two_fastapi_replicas_behind_nginx(compose: dict) -> None:
    services = compose["services"]
    first, second = services["fastapi-server"], services["fastapi-server-2"]
    assert second["image"] == first["image"] and second["build"] == first["build"]
    assert not second.get("ports")  # only through nginx; the seed's :8000 is the first replica
    assert {"fastapi-server", "fastapi-server-2"} <= set(services["nginx"]["depends_on"])
    nginx = (ROOT / "agent/serving/triton-docker/nginx.conf").read_text()
    assert "server fastapi-server:8000;" in nginx and "server fastapi-server-2:8000;" in nginx
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"


def test_builds_point_at_existing_dockerfiles(compose: dict) -> None:
    for name in ("triton-server", "fastapi-server"):
        build = compose["services"][name]["build"]
        assert (Path(build["context"]) / build["dockerfile"]).is_file(), name
    assert compose["services"]["triton-server"]["build"]["dockerfile"].endswith("triton-docker/Dockerfile.triton")


def test_seed_py_compile_command_needs_no_writable_model_repository(compose: dict, tmp_path: Path) -> None:
    # The seed's `docker exec dsa-agent-triton python -m py_compile /models/qwen3-vl/1/model.py` runs with the
    # container's environment, where /models is read-only: the bytecode must go to PYTHONPYCACHEPREFIX.
    prefix = compose["services"]["triton-server"]["environment"]["PYTHONPYCACHEPREFIX"]
    assert prefix.startswith("/tmp/")
    model = ROOT / "agent/serving/triton-models/qwen3-vl/1/model.py"
    env = clean_env() | {"PYTHONPYCACHEPREFIX": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "py_compile", str(model)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.rglob("model.*.pyc")), "bytecode was not written under PYTHONPYCACHEPREFIX"
