"""Launcher and backend set-up rules that need no running server: stub preparation, command line, settings."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from agent.config import LoadingStrategy
from agent.engine.errors import ModelLoadError
from agent.serving import stack
from agent.serving.triton import launcher as triton_launcher
from agent.serving.triton.backend import settings_from_parameters


def test_prepare_server_installs_the_stub_idempotently() -> None:
    binary = Path(triton_launcher.prepare_server())
    assert binary.name == "tritonserver" and os.access(binary, os.X_OK)
    stub = binary.parents[1] / "backends" / "python" / "triton_python_backend_stub"
    mode = stub.stat().st_mode
    assert stub.is_file() and mode & stat.S_IXUSR
    assert triton_launcher.prepare_server() == str(binary)  # second call: nothing to do, same answer


def test_command_line_and_environment() -> None:
    cfg = triton_launcher.TritonConfig(http_port=1, grpc_port=2, metrics_port=3)
    cmd = triton_launcher.server_command(cfg, "/x/tritonserver/bin/tritonserver")
    for flag in (
        "--http-port=1",
        "--grpc-port=2",
        "--metrics-port=3",
        "--disable-auto-complete-config",
        "--model-control-mode=explicit",
        "--load-model=qwen3-vl",
        "--backend-directory=/x/tritonserver/backends",
    ):
        assert flag in cmd
    assert f"--model-repository={triton_launcher.MODEL_REPOSITORY}" in cmd
    assert (triton_launcher.MODEL_REPOSITORY / "qwen3-vl" / "config.pbtxt").is_file()
    env = triton_launcher.server_env({"MODEL_PATH": "/m"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0].endswith("lib")
    assert env["MODEL_PATH"] == "/m" and Path(env[triton_launcher.ROOT_ENV], "agent", "__init__.py").is_file()


def test_addresses_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_HTTP_URL", "0.0.0.0:9001")
    monkeypatch.setenv("TRITON_GRPC_URL", "0.0.0.0:9002")
    monkeypatch.setenv("TRITON_METRICS_PORT", "9003")
    cfg = triton_launcher.config_from_args(triton_launcher.parse_args(["--grpc-port", "7002"]))
    assert (cfg.http_address, cfg.http_port, cfg.grpc_port, cfg.metrics_port) == ("0.0.0.0", 9001, 7002, 9003)
    assert cfg.control_key is None and not any("restricted" in a for a in triton_launcher.server_command(cfg, "/b/t"))
    monkeypatch.setenv("API_KEYS", " key-1 ,key-2")
    guarded = triton_launcher.TritonConfig.from_settings()
    assert guarded.control_key == "key-1"
    cmd = triton_launcher.server_command(guarded, "/b/t")
    assert "--http-restricted-api=model-repository:api-key=key-1" in cmd
    assert "--grpc-restricted-protocol=model-repository:api-key=key-1" in cmd
    assert stack.fastapi_env(cfg)["LOADING_STRATEGY"] == "triton"
    assert stack.fastapi_env(cfg)["TRITON_GRPC_URL"] == "0.0.0.0:7002"


def test_config_parameters_override_the_environment_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_PATH", "/env/model")
    monkeypatch.setenv("MAX_NEW_TOKENS", "77")
    params = {
        "MODEL_PATH": {"string_value": "/param/model"},
        "MAX_NEW_TOKENS": {"string_value": ""},  # empty: the environment's value stays
        "LOADING_STRATEGY": {"string_value": "transformers"},
        "NOT_A_SETTING": {"string_value": "ignored"},
    }
    settings = settings_from_parameters(params)
    assert settings.model_path == "/param/model"
    assert settings.max_new_tokens == 77
    assert settings.loading_strategy is LoadingStrategy.transformers


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"LOADING_STRATEGY": {"string_value": "triton"}}, "gateway"),
        ({"QUANTIZATION_TYPE": {"string_value": "int3"}}, "QUANTIZATION_TYPE"),
    ],
)
def test_bad_parameters_fail_the_load_with_a_reason(params: dict, needle: str) -> None:
    with pytest.raises(ModelLoadError, match=needle):
        settings_from_parameters(params)


def test_stack_gives_triton_a_real_engine_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOADING_STRATEGY", "triton")
    assert stack.triton_env() == {"LOADING_STRATEGY": "auto"}
    monkeypatch.setenv("LOADING_STRATEGY", "vllm")
    assert stack.triton_env() == {}


def test_instances_are_drained_when_every_live_one_is_done(tmp_path: Path) -> None:
    from agent.serving.triton.admission import instance_marker, instances_drained

    drain = tmp_path / "drain"
    assert not instances_drained(drain)  # no instance said it is live: nothing to conclude
    instance_marker(drain, "live", pid=11).touch()
    instance_marker(drain, "live", pid=12).touch()
    instance_marker(drain, "done", pid=11).touch()
    assert not instances_drained(drain)
    instance_marker(drain, "done", pid=12).touch()
    assert instances_drained(drain)


def test_a_server_still_up_after_its_models_drained_is_ended_after_the_margin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What tritonserver 2.51 does after some cancelled gRPC streams: every model instance drained and stopped its
    engine, yet the server waits out its whole exit timeout. The launcher ends it DRAINED_EXIT_MARGIN s later."""
    import subprocess
    import time

    from agent.serving.triton.admission import instance_marker

    monkeypatch.setattr(triton_launcher, "DRAINED_EXIT_MARGIN", 0.5)
    server = triton_launcher.TritonServer(triton_launcher.TritonConfig())
    server._drain_dir = str(tmp_path)
    # A process that ignores SIGTERM, like a server waiting for a model that never unloads.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
        start_new_session=True,
    )
    assert server.drain_file is not None
    instance_marker(server.drain_file, "live", pid=1).touch()
    started = time.monotonic()
    server._wait_for_exit(proc, timeout=0.8)  # not drained: the timeout ends it
    assert proc.wait(5) != 0 and 0.8 <= time.monotonic() - started < 3

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    instance_marker(server.drain_file, "done", pid=1).touch()
    started = time.monotonic()
    server._wait_for_exit(proc, timeout=30)
    assert proc.wait(5) != 0 and 0.5 <= time.monotonic() - started < 3  # drained: ended after the margin

    # Triton began to unload the drained instance (finalize removes its `live` marker): a normal exit, waited for.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"], start_new_session=True)
    instance_marker(server.drain_file, "live", pid=1).unlink()
    started = time.monotonic()
    server._wait_for_exit(proc, timeout=30)
    assert proc.wait(5) == 0 and time.monotonic() - started >= 1.4
