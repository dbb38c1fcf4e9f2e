"""Model versions: the repository layout and its rules (no server), then hot swaps on one real Triton server whose
versions are SmolLM2 (text only) and the tiny Qwen3-VL (sees images): an image request tells them apart."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from agent.config import LoadingStrategy
from agent.engine.errors import ModelLoadError, NotFoundError
from agent.serving.triton import launcher as triton_launcher
from agent.serving.triton import repository as repo
from agent.serving.triton import versions as mv
from agent.serving.triton.backend import settings_from_parameters
from agent.serving.triton.repository import read_version_file

SHIPPED = triton_launcher.MODEL_REPOSITORY / "qwen3-vl"
# Waits poll to a deadline: generous, since 2 shared cores under other test jobs can be slow; never a fixed sleep.
WAIT_TIMEOUT = 240.0
REQUEST_TIMEOUT = 240.0
RED = Image.new("RGB", (64, 64), (255, 0, 0))


# ---------------------------------------------------------------------------------------------------- no server
def test_the_shipped_repository_starts_one_version_from_the_environment() -> None:
    config = (SHIPPED / "config.pbtxt").read_text()
    assert "version_policy: { latest: { num_versions: 1 } }" in config
    assert repo.version_numbers(SHIPPED) == [1]
    pinned = read_version_file(SHIPPED / "1")
    assert pinned and set(pinned.values()) == {""}  # nothing pinned: MODEL_PATH etc. come from the environment


def test_version_file_beats_parameters_beats_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODEL_PATH", "/env/model")
    monkeypatch.setenv("MAX_NEW_TOKENS", "77")
    monkeypatch.setenv("DTYPE", "bfloat16")
    (tmp_path / "engine.json").write_text(json.dumps({"MODEL_PATH": "/pinned/model", "DTYPE": ""}))
    params = {"MODEL_PATH": {"string_value": "/param/model"}, "MAX_NEW_TOKENS": {"string_value": "12"}}
    settings = settings_from_parameters(params, read_version_file(tmp_path))
    assert settings.model_path == "/pinned/model"  # version file
    assert settings.max_new_tokens == 12  # parameter (the version pins none)
    assert settings.dtype.value == "bfloat16"  # environment ("" in the version file defers)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"MODLE_PATH": "/x"}', "MODLE_PATH: not settings"),
        ('{"MAX_NEW_TOKENS": 5}', "values must be strings"),
    ],
)
def test_a_bad_version_file_fails_the_load_naming_the_file(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "engine.json").write_text(content)
    with pytest.raises(ModelLoadError, match=needle) as info:
        read_version_file(tmp_path)
    assert str(tmp_path / "engine.json") in info.value.message


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"quantization_type": "int3"}, "QUANTIZATION_TYPE"),
        ({"no_such_setting": "1"}, "NO_SUCH_SETTING: not a setting"),
        ({"loading_strategy": LoadingStrategy.triton}, "gateway mode"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(changes: dict, needle: str) -> None:
    with pytest.raises(ModelLoadError, match=needle):
        repo.pinned_settings(changes)


def corrupt_checkpoints(root: Path) -> dict[str, Path]:
    """Folders that look like checkpoints and are not: each must be refused before anything is written."""
    made = {}
    for name, config, weights in [
        ("broken-config", "{not json", b""),
        ("no-model-type", "{}", b""),
        ("no-weights", '{"model_type": "llama"}', None),
        ("truncated-weights", '{"model_type": "llama"}', b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
        ("garbage-weights", '{"model_type": "llama"}', b"\xff" * 64),
    ]:
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(config)
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
        made[name] = folder
    return made


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("../../../../etc", "absolute path without '..'"),
        ("models/../../etc", "absolute path without '..'"),
        ("/etc/../etc", "absolute path without '..'"),
        ("relative/folder/model", "absolute path"),
        ("/etc", "no config.json"),
        ("/no/such/checkpoint", "no such folder"),
        ("/no/such/model.gguf", "no such .gguf file"),
        ("http://169.254.169.254/latest", "absolute path"),
    ],
)
def test_a_version_refuses_a_model_path_that_is_not_a_checkpoint(value: str, needle: str) -> None:
    with pytest.raises(ModelLoadError, match=f"MODEL_PATH={value!r}") as info:
        repo.preflight(repo.pinned_settings({"model_path": value}))
    assert needle in info.value.message


def test_corrupt_checkpoints_and_missing_packages_are_refused_before_loading(
    tmp_path: Path, smollm_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needles = {
        "broken-config": "config.json is not valid JSON",
        "no-model-type": "names no model_type",
        "no-weights": "no weights",
        "truncated-weights": "not a readable safetensors file",
        "garbage-weights": "not a readable safetensors file",
    }
    for name, folder in corrupt_checkpoints(tmp_path).items():
        with pytest.raises(ModelLoadError, match=needles[name]):
            repo.check_model_path(str(folder))
    repo.check_model_path(str(smollm_folder))  # a real checkpoint passes
    repo.check_model_path("Qwen/Qwen3-VL-8B-Instruct")  # a hub id: fetched (or refused) where the model loads
    monkeypatch.setitem(repo.ENGINE_PACKAGES, "vllm", "no_such_engine_package")  # as on a machine without vLLM
    with pytest.raises(ModelLoadError, match="LOADING_STRATEGY=vllm: the 'no_such_engine_package' package"):
        repo.preflight({"LOADING_STRATEGY": "vllm"})


def test_versions_are_written_to_a_runtime_copy_never_to_the_source_tree(tmp_path: Path) -> None:
    with pytest.raises(repo.VersionsUnavailable, match="never written"):
        repo.write_version(SHIPPED, {"MODEL_PATH": "/x"})
    assert repo.version_numbers(SHIPPED) == [1]

    runtime = repo.prepare_runtime_repository(triton_launcher.MODEL_REPOSITORY, tmp_path / "repo")
    model_dir = runtime / "qwen3-vl"
    assert repo.version_numbers(model_dir) == [1] and (model_dir / repo.RUNTIME_MARKER).is_file()
    pinned = repo.pinned_settings({"model_path": "/ckpt", "dtype": "float32", "device": None})
    assert repo.write_version(model_dir, pinned) == 2
    assert (model_dir / "2" / "model.py").read_bytes() == (SHIPPED / "1" / "model.py").read_bytes()
    assert read_version_file(model_dir / "2") == {"MODEL_PATH": "/ckpt", "DTYPE": "float32", "DEVICE": ""}
    assert repo.write_version(model_dir, {}) == 3 and repo.version_numbers(model_dir) == [1, 2, 3]
    repo.remove_version(model_dir, 3)

    # The next start serves the source's versions again; a folder the launcher did not copy is never replaced.
    repo.prepare_runtime_repository(triton_launcher.MODEL_REPOSITORY, runtime)
    assert repo.version_numbers(model_dir) == [1]
    (model_dir / repo.RUNTIME_MARKER).unlink()
    with pytest.raises(ModelLoadError, match="not a runtime copy"):
        repo.prepare_runtime_repository(triton_launcher.MODEL_REPOSITORY, runtime)
    with pytest.raises(ModelLoadError, match="must not be the source"):
        repo.prepare_runtime_repository(triton_launcher.MODEL_REPOSITORY, triton_launcher.MODEL_REPOSITORY)


def test_the_launcher_serves_a_runtime_copy_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(triton_launcher.RUNTIME_REPOSITORY_ENV, str(tmp_path / "rt"))
    cfg = triton_launcher.TritonConfig.from_settings()
    assert cfg.runtime_repository == tmp_path / "rt" and cfg.served_repository == tmp_path / "rt"
    assert f"--model-repository={tmp_path / 'rt'}" in triton_launcher.server_command(cfg, "/b/t")
    assert triton_launcher.TritonConfig().served_repository == triton_launcher.MODEL_REPOSITORY


async def test_only_a_gateway_engine_loads_through_triton() -> None:
    from agent.engine.fake import FakeEngine
    from agent.serving.triton.gateway import TritonGatewayEngine

    assert await FakeEngine().load_model({"model_path": "/x"}) is None  # the runner loads a new engine as usual
    assert await FakeEngine().model_versions() is None
    gateway = TritonGatewayEngine("127.0.0.1:1")  # never started: changes that leave gateway mode are not its to load
    assert await gateway.load_model({"loading_strategy": "transformers", "model_path": "/x"}) is None
    assert await gateway.model_versions() is None
    source = mv.TritonVersions(client=None, model="qwen3-vl", repository=SHIPPED)
    with pytest.raises(repo.VersionsUnavailable, match="never written"):
        await source.model_folder()  # the gateway then reloads parameters instead of adding a version


# ---------------------------------------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def versioned_triton(smollm_folder: Path, tiny_vl_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One Triton whose repository has version 1 (the environment: SmolLM2) and 2 (pins the tiny Qwen3-VL)."""
    from tests.serving.triton.triton_fixtures import CONTROL_KEY, RunningTriton, free_port, smollm_env

    work = tmp_path_factory.mktemp("triton-versions")
    source = work / "source"
    shutil.copytree(triton_launcher.MODEL_REPOSITORY, source, ignore=shutil.ignore_patterns("__pycache__"))
    repo.write_version(source / "qwen3-vl", {"MODEL_PATH": str(tiny_vl_folder)})
    cfg = triton_launcher.TritonConfig(
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        model_repository=source,
        runtime_repository=work / "runtime",
        exit_timeout=5,
        control_key=CONTROL_KEY,
        extra_env=smollm_env(smollm_folder),
    )
    server = triton_launcher.TritonServer(cfg, log_path=work / "triton.log")
    server.start(timeout=600)
    try:
        yield RunningTriton(server, work / "prompts.jsonl", work / "triton.log")
    finally:
        server.stop()


def gateway_settings(versioned_triton, **extra: object):
    """Settings of a FastAPI gateway to the versioned Triton server, with the control key."""
    from agent.config import load_settings
    from tests.serving.triton.triton_fixtures import CONTROL_KEY

    return load_settings(
        loading_strategy="triton",
        triton_grpc_url=versioned_triton.grpc_url,
        triton_http_url=versioned_triton.http_url,
        triton_metrics_port=versioned_triton.server.cfg.metrics_port,
        api_keys=CONTROL_KEY,
        **extra,
    )


@pytest.fixture
async def gateway(versioned_triton):
    from agent.serving.triton.gateway import TritonGatewayEngine

    engine = TritonGatewayEngine.from_settings(gateway_settings(versioned_triton))
    await engine.start()
    yield engine
    await engine.shutdown()


def wait_healthy(client, timeout: float = WAIT_TIMEOUT) -> None:
    """Poll the FastAPI door's /health until it answers 200 (the gateway engine connects in the background)."""
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get("/health").status_code == 200, client.get("/health").text


def sees_images(triton, version: str = "") -> bool:
    """Whether the version (default: the policy's) answers an image: the tiny Qwen3-VL does, SmolLM2 refuses (400)."""
    from agent.client.errors import DsaClientError
    from agent.client.triton_client import TritonHttpClient

    with TritonHttpClient(triton.http_url, model_version=version) as client:
        try:
            client.chat("What is this?", RED, max_new_tokens=2, use_history=False)
        except DsaClientError as exc:
            assert exc.status == 400 and exc.code == "unsupported_input", exc
            return False
    return True


@pytest.mark.slow
@pytest.mark.triton
async def test_latest_policy_then_both_versions_answer_when_addressed(
    versioned_triton, gateway, smollm_folder: Path, tiny_vl_folder: Path
) -> None:
    from agent.client.triton_client import TritonGrpcClient, TritonHttpClient

    status = await gateway.versions.status()  # started under the shipped policy: latest, one version
    assert status.policy == {"latest": {"num_versions": 1}}
    assert (status.ready, status.default_version) == ([2], 2) and status.versions[-1].supports_images
    assert gateway.info().supports_images

    status = await gateway.versions.serve([1, 2])
    assert (status.ready, status.default_version) == ([1, 2], 2)
    listed = await gateway.model_versions()  # what /health and /v1/models show in gateway mode
    assert listed is not None and listed["default_version"] == 2
    assert [(v["version"], v["state"], v["model_path"]) for v in listed["versions"]] == [
        (1, "READY", str(smollm_folder)),
        (2, "READY", str(tiny_vl_folder)),
    ]
    assert status.policy == {"specific": {"versions": ["1", "2"]}}  # Triton's JSON writes int64 as strings
    assert {v.version: v.supports_images for v in status.versions} == {1: False, 2: True}
    assert [sees_images(versioned_triton, v) for v in ("1", "2", "")] == [False, True, True]  # "": the highest
    for client_type, url in (
        (TritonHttpClient, versioned_triton.http_url),
        (TritonGrpcClient, versioned_triton.grpc_url),
    ):
        for version in ("1", "2"):
            with client_type(url, model_version=version) as client:
                assert client.check_health()
                answer, _ = client.chat("Name a tree.", max_new_tokens=3, temperature=0.0, use_history=False)
                assert answer.strip(), (client_type, version)
    assert versioned_triton.get("/v2/models/qwen3-vl/versions/1/ready")[0] == 200


@dataclass(frozen=True)
class Answered:
    started: float
    ended: float
    prompt_tokens: int  # tells the versions apart: SmolLM2's template adds a system prompt, the tiny VL's does not
    completion_tokens: int


class SteadyStream:
    """Unversioned requests back to back from `threads` threads: records answers and failures while versions swap."""

    def __init__(self, triton, *, max_tokens: int = 2, threads: int = 1) -> None:
        self.triton = triton
        self.body = {"text_input": "Say hi.", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        self.answers: list[Answered] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, raw = self.triton.post("/v2/models/qwen3-vl/generate", self.body, timeout=REQUEST_TIMEOUT)
            except OSError as exc:  # a hung request (timeout) is a failure, not a dead thread
                status, raw = 0, repr(exc).encode()
            answer = json.loads(raw) if status == 200 else {}
            if answer.get("finish_reason") == "length" and answer["completion_tokens"] == self.body["max_tokens"]:
                self.answers.append(
                    Answered(started, time.monotonic(), answer["prompt_tokens"], answer["completion_tokens"])
                )
            else:
                self.failures.append(f"{status}: {raw[:300]!r}")

    def __enter__(self) -> SteadyStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def wait_for(self, answers: int, timeout: float = WAIT_TIMEOUT) -> None:
        """Poll until `answers` more answers arrived (or a failure): the deadline is generous because the machine
        may be busy (a fixed sleep once timed out under load); the assertion says what was missing."""
        deadline = time.monotonic() + timeout
        target = len(self.answers) + answers
        while len(self.answers) < target and not self.failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.failures or len(self.answers) >= target, f"{len(self.answers)}/{target} answers in {timeout} s"


def prompt_tokens(triton, version: str) -> int:
    status, raw = triton.post(
        f"/v2/models/qwen3-vl/versions/{version}/generate", {"text_input": "Say hi.", "max_tokens": 1}
    )
    assert status == 200, raw
    return json.loads(raw)["prompt_tokens"]


@pytest.mark.slow
@pytest.mark.triton
async def test_roll_forward_and_back_under_a_steady_stream_drops_nothing(
    versioned_triton, gateway, smollm_folder: Path
) -> None:
    status = await gateway.versions.status()
    if status.ready != [1, 2]:  # the state the test before leaves (run alone: get there)
        await gateway.versions.serve([1, 2])
    vl_tokens = prompt_tokens(versioned_triton, "2")
    model_dir = await gateway.versions.model_folder()
    assert model_dir.parent == versioned_triton.server.cfg.runtime_repository.resolve()

    # Short requests, plus long ones (64 tokens) that are still running on the old version when the new one answers.
    with SteadyStream(versioned_triton) as short, SteadyStream(versioned_triton, max_tokens=64, threads=2) as long:
        short.wait_for(3)
        # What /load_model does in gateway mode: roll forward to a new version 3.
        info = await gateway.load_model({"model_path": str(smollm_folder), "loading_strategy": "triton"})
        assert not info.supports_images and not await asyncio.to_thread(sees_images, versioned_triton)
        status = await gateway.versions.status()
        assert (status.ready, status.default_version, status.history[-2:]) == ([3], 3, (2, 3))
        assert read_version_file(model_dir / "3")["MODEL_PATH"] == str(smollm_folder)
        smol_tokens = await asyncio.to_thread(prompt_tokens, versioned_triton, "3")
        short.wait_for(3)

        status = await gateway.versions.rollback()  # back to version 2
        info = await gateway.refresh_info(status.default_version)
        assert info.supports_images and await asyncio.to_thread(sees_images, versioned_triton)
        assert (await gateway.versions.status()).ready == [2]
        short.wait_for(3)
    assert short.failures == [] and long.failures == []
    assert vl_tokens != smol_tokens
    answers = short.answers + long.answers
    assert {a.prompt_tokens for a in answers} == {vl_tokens, smol_tokens}  # both versions answered the stream
    first_on_new = min(a.started for a in answers if a.prompt_tokens == smol_tokens)
    straddling = [a for a in long.answers if a.prompt_tokens == vl_tokens and a.started < first_on_new < a.ended]
    assert straddling, "no long request was in flight on the old version when the new one began answering"


@pytest.mark.slow
@pytest.mark.triton
async def test_a_broken_version_fails_with_its_reason_and_the_serving_one_stays(versioned_triton, gateway) -> None:
    model_dir = await gateway.versions.model_folder()
    before, folders = await gateway.versions.status(), repo.version_numbers(model_dir)
    with SteadyStream(versioned_triton) as stream:
        with pytest.raises(ModelLoadError, match="MODEL_PATH='/no/such/checkpoint'"):
            await gateway.load_model({"model_path": "/no/such/checkpoint"})
        assert repo.version_numbers(model_dir) == folders  # the failed version's folder is gone again
        with pytest.raises(ModelLoadError, match="QUANTIZATION_TYPE"):
            await gateway.load_model({"quantization_type": "int3"})
        broken = repo.write_version(model_dir, {})
        (model_dir / str(broken) / "engine.json").write_text('{"MAX_NEW_TOKENS": 5}')  # hand-edited, wrong type
        with pytest.raises(ModelLoadError, match="values must be strings"):
            await gateway.versions.activate(broken)
        stream.wait_for(3)
    after = await gateway.versions.status()
    assert after.default_version == before.default_version and after.ready == before.ready
    assert [v.model_path for v in after.versions if v.state == "READY"] == [
        v.model_path for v in before.versions if v.state == "READY"
    ]
    failed = next(v for v in after.versions if v.version == broken)
    assert failed.state == "UNAVAILABLE" and "values must be strings" in failed.reason
    assert stream.failures == [] and len(stream.answers) >= 3
    with pytest.raises(NotFoundError):
        await gateway.versions.rollback()  # nothing activated after the first version this gateway saw


@pytest.mark.slow
@pytest.mark.triton
def test_fastapi_load_model_in_gateway_mode_adds_a_version(versioned_triton, tmp_path: Path) -> None:
    """The FastAPI door as `make run` starts it (gateway mode): /load_model rolls Triton forward, /health and
    /v1/models list the versions, a checkpoint that cannot load answers 422 and the old version keeps serving."""
    from fastapi.testclient import TestClient

    from agent.serving.model_server import create_app
    from tests.serving.triton.triton_fixtures import CONTROL_KEY

    settings = gateway_settings(versioned_triton, history_db=tmp_path / "history.sqlite3")
    auth = {"Authorization": f"Bearer {CONTROL_KEY}"}
    with TestClient(create_app(settings)) as client:
        wait_healthy(client)
        before = client.get("/health").json()["versions"]
        serving = before["default_version"]
        path = next(v["model_path"] for v in before["versions"] if v["version"] == serving)

        failed = client.post("/load_model", json={"model_path": str(tmp_path / "missing")}, headers=auth)
        assert failed.status_code == 422 and "MODEL_PATH" in failed.json()["error"]["message"], failed.text
        assert client.get("/health").json()["versions"]["default_version"] == serving

        loaded = client.post("/load_model", json={"dtype": "float32"}, headers=auth)  # same checkpoint, new version
        assert loaded.status_code == 200, loaded.text
        listed = client.get("/v1/models", headers=auth).json()["versions"]
        new = listed["default_version"]
        assert new > serving and [v["version"] for v in listed["versions"] if v["state"] == "READY"] == [new]
        assert next(v["model_path"] for v in listed["versions"] if v["version"] == new) == path  # kept MODEL_PATH
        chat = client.post("/chat", json={"message": "Hi!", "max_new_tokens": 2}, headers=auth)
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] > 0


@pytest.mark.slow
@pytest.mark.triton
def test_a_failed_load_leaves_no_trace_in_either_door(versioned_triton, tmp_path: Path, tiny_vl_folder: Path) -> None:
    """Bad paths, path traversal, corrupt checkpoints, a checkpoint only Triton can find broken, and a broken version
    loaded through Triton's own repository API: each is refused, and afterwards both doors are as they were - the
    same versions READY, no version folder left, Triton's /v2/health/ready 200, FastAPI /health ready, and the
    serving version answering through both doors."""
    import httpx
    from fastapi.testclient import TestClient

    from agent.serving.model_server import create_app
    from tests.serving.triton.triton_fixtures import CONTROL_KEY

    settings = gateway_settings(versioned_triton, history_db=tmp_path / "history.sqlite3")
    auth = {"Authorization": f"Bearer {CONTROL_KEY}"}
    corrupt = corrupt_checkpoints(tmp_path / "ckpt")
    # Passes every check this side (config.json, readable weights) and only fails inside Triton's engine load.
    unknown = tmp_path / "ckpt" / "unknown-architecture"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no_such_architecture"}')
    shutil.copyfile(next(tiny_vl_folder.glob("*.safetensors")), unknown / "model.safetensors")

    def door_state(client) -> tuple:
        versions = client.get("/health").json()["versions"]
        ready = [v["version"] for v in versions["versions"] if v["state"] == "READY"]
        return ready, versions["default_version"], [v["version"] for v in versions["versions"]]

    with TestClient(create_app(settings)) as client:
        wait_healthy(client)
        before = door_state(client)
        model_dir = Path(versioned_triton.server.cfg.runtime_repository) / "qwen3-vl"
        folders = repo.version_numbers(model_dir)
        paths = ["../../../../etc", "/etc", str(tmp_path / "missing"), *map(str, corrupt.values()), str(unknown)]
        for path in paths:
            failed = client.post("/load_model", json={"model_path": path}, headers=auth)
            message = failed.json()["error"]["message"]
            assert failed.status_code == 422 and ("MODEL_PATH" in message or path in message), (path, failed.text)
            assert repo.version_numbers(model_dir) == folders, path  # nothing written, or removed again
            assert versioned_triton.get("/v2/health/ready")[0] == 200, path
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ready", (path, health.text)
            assert door_state(client) == before, path

        # Triton's door: a broken version loaded with Triton's own repository API (no code of ours in the way).
        broken = repo.write_version(model_dir, {})
        (model_dir / str(broken) / "engine.json").write_text("{not json")
        config = json.loads(versioned_triton.get("/v2/models/qwen3-vl/config")[1])
        config["version_policy"] = {"specific": {"versions": [broken]}}
        loaded = httpx.post(
            f"http://{versioned_triton.http_url}/v2/repository/models/qwen3-vl/load",
            json={"parameters": {"config": json.dumps(config)}},
            headers={"api-key": CONTROL_KEY},
            timeout=REQUEST_TIMEOUT,
        )
        assert loaded.status_code == 400 and "not valid JSON" in loaded.text, loaded.text
        assert versioned_triton.get("/v2/health/ready")[0] == 200  # strict readiness would say 400 until a restart
        assert door_state(client)[:2] == before[:2]  # the broken folder is still there, so it is listed, failed
        repo.remove_version(model_dir, broken)
        assert door_state(client) == before  # and once its folder is gone, forgotten

        chat = client.post("/chat", json={"message": "Still there?", "max_new_tokens": 2}, headers=auth)
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] > 0
    generate = versioned_triton.post("/v2/models/qwen3-vl/generate", {"text_input": "Still there?", "max_tokens": 2})
    assert generate[0] == 200 and json.loads(generate[1])["completion_tokens"] > 0
