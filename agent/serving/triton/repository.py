"""The Triton model repository on disk: version folders, their pinned settings, and the runtime copy Triton serves.

Layout (docs/versioning.md): `<repository>/qwen3-vl/config.pbtxt` and one folder per version, `N/model.py` (the same
thin shell everywhere) beside `N/engine.json` (the settings that version pins; read by
agent.serving.triton.backend.read_version_file). Versions are only ever written into a runtime copy, never into the
source tree.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Settings, SettingsError, load_settings
from agent.engine.errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)

VERSION_FILE = "engine.json"
SHELL = "model.py"
SOURCE_REPOSITORY = Path(__file__).resolve().parents[1] / "triton-models"
RUNTIME_MARKER = ".newbie-runtime-copy"  # marks a model folder the launcher copied (safe to replace at start)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
WEIGHTS = ("*.safetensors", "*.bin")
# The package each engine imports: a version pinning an engine whose package is missing is refused before loading.
ENGINE_PACKAGES = {"transformers": "transformers", "vllm": "vllm", "onnx": "onnxruntime_genai"}


class VersionsUnavailable(ModelLoadError):
    """This process cannot add versions: Triton's model folder is the source tree, or not reachable from here."""


def version_numbers(model_dir: Path) -> list[int]:
    """The version folders of a model folder, ascending (Triton ignores names with leading zeros; so do we)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0")


def pinned_settings(changes: Mapping[str, Any]) -> dict[str, str]:
    """Settings changes (names as in Settings or upper case; None = not pinned) -> engine.json contents.

    Names and values are checked here with the same validation as start-up, so a bad value (e.g. QUANTIZATION_TYPE=
    int3) is refused with its variable named before anything is written or loaded.
    """
    pinned: dict[str, str] = {}
    for key, value in changes.items():
        name = key.lower()
        if name not in Settings.model_fields:
            raise ModelLoadError(f"{key.upper()}: not a setting (see `dsa-agent config`)")
        pinned[name.upper()] = "" if value is None else str(getattr(value, "value", value))
    try:
        load_settings(**{k.lower(): v for k, v in pinned.items() if v})
    except SettingsError as exc:
        raise ModelLoadError(str(exc)) from None
    if pinned.get("LOADING_STRATEGY") == "triton":
        raise ModelLoadError("LOADING_STRATEGY=triton is the gateway mode; a version pins a real engine")
    return pinned


def preflight(pinned: Mapping[str, str]) -> None:
    """Refuse (ModelLoadError, 422) a version that cannot load, before anything is written or sent to Triton.

    Triton 2.51 never forgets a version that failed to load (its record stays UNAVAILABLE until that number loads
    successfully), so what can be checked here is: MODEL_PATH (see `check_model_path`) and the engine's package.
    What only loading can tell (weights that do not fit, a checkpoint corrupt past its headers) is Triton's to find.
    """
    if pinned.get("MODEL_PATH"):
        check_model_path(pinned["MODEL_PATH"])
    strategy = pinned.get("LOADING_STRATEGY", "")
    package = ENGINE_PACKAGES.get(strategy)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ModelLoadError(f"LOADING_STRATEGY={strategy}: the {package!r} package is not installed")


def check_model_path(value: str) -> None:
    """MODEL_PATH as a version pins it: an absolute path to a Hugging Face folder (config.json that parses, and
    weights whose headers read: a truncated or garbage safetensors file is refused) or to a .gguf file, or a hub id
    `owner/name`. Relative paths are refused: Triton resolves them from its own working directory, and `..` is how
    a caller would walk out of the models folder."""
    path = Path(value).expanduser()
    if ".." in path.parts or not path.is_absolute():
        if ".." not in path.parts and HUB_ID.match(value) and not path.exists():
            return  # a hub id: fetched (or not) where the model loads
        raise ModelLoadError(
            f"MODEL_PATH={value!r}: a version's checkpoint must be an absolute path without '..' (or a hub id "
            "owner/name)"
        )
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"MODEL_PATH={value!r}: no such .gguf file")
        return
    if not path.is_dir():
        raise ModelLoadError(f"MODEL_PATH={value!r}: no such folder")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"MODEL_PATH={value!r}: not a Hugging Face model folder (no config.json)")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"MODEL_PATH={value!r}: config.json is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict) or not parsed.get("model_type"):
        raise ModelLoadError(f"MODEL_PATH={value!r}: config.json names no model_type")
    weights = sorted(f for pattern in WEIGHTS for f in path.glob(pattern))
    if not weights:
        raise ModelLoadError(f"MODEL_PATH={value!r}: no weights (*.safetensors or *.bin) in the folder")
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors(value, file)


def _check_safetensors(value: str, file: Path) -> None:
    """Read the file's header (no tensor is loaded): safetensors checks that it covers the whole file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"MODEL_PATH={value!r}: {file.name} is not a readable safetensors file ({exc})") from None


def write_version(model_dir: Path, pinned: Mapping[str, str], version: int | None = None) -> int:
    """Write a new version folder (`model.py` shell + `engine.json`) atomically; returns its number.

    `version` None: one more than the highest existing folder. Refuses to write into the source tree.
    """
    model_dir = model_dir.resolve()
    if model_dir.is_relative_to(SOURCE_REPOSITORY):
        raise VersionsUnavailable(
            f"{model_dir} is the source tree's model repository, which is never written: start Triton on a runtime "
            "copy (`dsa-agent triton` / `make run` do; see NEWBIE_TRITON_REPOSITORY) to add versions"
        )
    shell = SOURCE_REPOSITORY / model_dir.name / "1" / SHELL
    if not shell.is_file():  # a model of another name: its own lowest version's shell
        existing = [model_dir / str(v) / SHELL for v in version_numbers(model_dir)]
        shell = next((p for p in existing if p.is_file()), shell)
    number = version if version is not None else max(version_numbers(model_dir), default=0) + 1
    target = model_dir / str(number)
    if target.exists():
        raise InvalidRequestError(f"version {number} of {model_dir.name} already exists")
    tmp = model_dir / f".tmp-{number}"  # not a number: Triton ignores it until the rename
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        shutil.copyfile(shell, tmp / SHELL)
        (tmp / VERSION_FILE).write_text(json.dumps(dict(pinned), indent=2) + "\n", encoding="utf-8")
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"cannot write version {number} into {model_dir}: {exc}") from None
    log.info("wrote version %s of %s: %s", number, model_dir.name, dict(pinned))
    return number


def remove_version(model_dir: Path, version: int) -> None:
    """Delete a version folder written by `write_version` (after it failed to load)."""
    shutil.rmtree(model_dir / str(version), ignore_errors=True)


def prepare_runtime_repository(source: Path, runtime: Path) -> Path:
    """Copy the source model repository to `runtime` (what Triton serves and versions are added to); returns it.

    Model folders this function copied before are replaced, so every start serves the source's versions; versions
    added at run time last until the next start (to keep one, add its folder to the source repository). A folder in
    `runtime` it did not copy is never deleted.
    """
    runtime = runtime.resolve()
    if runtime == source.resolve() or runtime.is_relative_to(SOURCE_REPOSITORY):
        raise ModelLoadError(f"the runtime repository {runtime} must not be the source repository")
    runtime.mkdir(parents=True, exist_ok=True)
    for model in sorted(p for p in source.iterdir() if p.is_dir()):
        target = runtime / model.name
        if target.exists():
            if not (target / RUNTIME_MARKER).exists():
                raise ModelLoadError(f"{target} exists and is not a runtime copy: remove it or choose another folder")
            shutil.rmtree(target)
        shutil.copytree(model, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (target / RUNTIME_MARKER).write_text(f"copied from {model}\n", encoding="utf-8")
    return runtime


def read_version_file(folder: Path) -> dict[str, str]:
    """A version folder's pinned settings (`engine.json`, a flat JSON object); {} when the folder has none.

    Unknown names and non-string values fail the load with a message naming the file: a typo must not silently
    fall back to the environment's value.
    """
    path = folder / VERSION_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f'{path}: must be a JSON object of settings, e.g. {{"MODEL_PATH": "..."}}')
    unknown = sorted(k for k in data if k.lower() not in Settings.model_fields)
    if unknown:
        raise ModelLoadError(f"{path}: {', '.join(unknown)}: not settings (see `dsa-agent config`)")
    bad = sorted(k for k, v in data.items() if not isinstance(v, str))
    if bad:
        raise ModelLoadError(f'{path}: {", ".join(bad)}: values must be strings ("" = not pinned)')
    return {k.upper(): v for k, v in data.items()}
