"""start-services.sh: the seed's `./triton-docker/start-services.sh` from the repository root picks Docker when a
daemon answers and the local stack otherwise (checked with --dry-run and a stand-in `docker` on PATH)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from deploy_helpers import ROOT, TRITON_DOCKER, require_tool, run_tool

pytestmark = pytest.mark.deploy

SEED_COMMAND = "./triton-docker/start-services.sh"  # the seed's quick start, run from the repository root
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # without /usr/local/bin, where a real docker client may live


def fake_docker(tmp_path: Path, *, daemon: bool) -> dict[str, str]:
    """An environment whose `docker` answers `info` (or not) and has the compose plugin."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    docker = bin_dir / "docker"
    docker.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = info ] && exit {0 if daemon else 1}\n'
        '[ "$1" = compose ] && [ "$2" = version ] && exit 0\n'
        "exit 3\n"
    )
    docker.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{SYSTEM_PATH}"}


def start(*args: str, env: dict[str, str]):
    return run_tool([SEED_COMMAND, *args], env=env, timeout=60)


def test_seed_path_is_an_executable_symlink_to_the_triton_docker_folder() -> None:
    link = ROOT / "triton-docker"
    assert link.is_symlink() and link.resolve() == TRITON_DOCKER
    assert os.access(ROOT / SEED_COMMAND, os.X_OK)


@pytest.mark.parametrize("script", ["agent/serving/triton-docker/start-services.sh", "deploy/install-tools.sh"])
def test_shellcheck_clean(script: str) -> None:
    proc = run_tool([require_tool("shellcheck"), str(ROOT / script)])
    assert proc.returncode == 0, proc.stdout


def test_help_names_both_modes(tmp_path: Path) -> None:
    proc = start("--help", env=fake_docker(tmp_path, daemon=False))
    assert proc.returncode == 0
    assert "docker compose build && docker compose up -d" in proc.stdout
    assert ".venv/bin/python -m agent.cli up" in proc.stdout


def test_without_a_daemon_it_starts_the_local_stack(tmp_path: Path) -> None:
    proc = start("--dry-run", env=fake_docker(tmp_path, daemon=False))
    assert proc.returncode == 0, proc.stderr
    expected = "+ exec .venv/bin/python -m agent.cli up" if (ROOT / ".venv/bin/python").exists() else "+ exec make run"
    assert expected in proc.stdout
    assert "compose" not in proc.stdout.replace("docker compose build && docker compose up -d", "")


def test_without_docker_installed_it_starts_the_local_stack() -> None:
    proc = start("--dry-run", "--", "--log-level", "debug", env={**os.environ, "PATH": SYSTEM_PATH})
    assert proc.returncode == 0, proc.stderr
    assert "agent.cli up --log-level debug" in proc.stdout or "make run" in proc.stdout


def test_with_a_daemon_it_builds_and_starts_compose(tmp_path: Path) -> None:
    env = fake_docker(tmp_path, daemon=True)
    proc = start("--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    compose = f"docker compose -f {ROOT}/docker-compose.yml"
    assert f"+ {compose} build\n+ {compose} up -d" in proc.stdout
    assert "agent.cli up" not in proc.stdout
    assert "build" not in start("--dry-run", "--no-build", env=env).stdout.replace("Docker daemon", "")


def test_docker_mode_without_a_daemon_fails_clearly(tmp_path: Path) -> None:
    env = fake_docker(tmp_path, daemon=False)
    proc = start("--docker", "--dry-run", env=env)
    assert proc.returncode == 1 and "no Docker daemon answers" in proc.stderr
    assert start("--bogus", env=env).returncode == 2
