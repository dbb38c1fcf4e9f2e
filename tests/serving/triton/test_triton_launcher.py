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
