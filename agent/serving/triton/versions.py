"""Versions of the Triton model: numbered folders in a model repository, swapped through Triton's repository API.

The folders themselves (layout, engine.json, the runtime copy) are agent.serving.triton.repository's.

Triton's rules this module builds on (explicit model control, 2.51):
- a request that names no version goes to the highest-numbered READY version;
- a load with a config override loads every version its `version_policy` selects in the background; only when all of
  them are ready does it swap them in and release the versions it no longer selects. A released version finishes the
  requests it already holds (they keep the model alive; our model's finalize also drains) - so a swap drops nothing;
- if any selected version fails, the newly loaded ones are released and the serving ones are left untouched.

So "activate version N" is a load whose policy is `specific: [N]`, "serve versions [1, 3]" loads both (3 answers
unversioned requests), and "roll back" activates the version that was the default before. New versions are written
by the process that adds them into the model folder Triton serves (same filesystem), never into the source tree.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.engine.errors import InvalidRequestError, ModelLoadError, NotFoundError
from agent.serving.triton.metrics import INFO_METRIC, fetch_metrics_text, parse_samples
from agent.serving.triton.repository import (
    SOURCE_REPOSITORY,
    VersionsUnavailable,
    pinned_settings,
    preflight,
    remove_version,
    write_version,
)

if TYPE_CHECKING:  # imported lazily at run time: tritonclient loads grpc and its protobufs
    from tritonclient.grpc.aio import InferenceServerClient

log = logging.getLogger(__name__)

LOAD_TIMEOUT = 900.0  # s a repository-API load may take (vLLM inside Triton: 30-120 s on CPU)


# ---------------------------------------------------------------------------------------------------- the server
@dataclass(frozen=True)
class VersionState:
    """One version as Triton reports it."""

    version: int
    state: str  # READY | LOADING | UNLOADING | UNAVAILABLE
    reason: str = ""
    model_name: str = ""  # what the version loaded (from its info metric; "" while not serving)
    model_path: str = ""
    supports_images: bool = False


@dataclass(frozen=True)
class VersionsStatus:
    """What is loaded, and which version answers requests that name none."""

    model: str
    policy: dict[str, Any]
    default_version: int | None
    versions: tuple[VersionState, ...] = ()
    history: tuple[int, ...] = ()  # defaults this process activated, oldest first (rollback walks it back)

    @property
    def ready(self) -> list[int]:
        return [v.version for v in self.versions if v.state == "READY"]


@dataclass
class TritonVersions:
    """Version control of one Triton model over its repository API (see the module docstring).

    `client` is a started `tritonclient.grpc.aio.InferenceServerClient`; `control_key` the API key guarding the
    repository API (API_KEYS); `repository` the model folder Triton serves, when this process can write to it (None:
    learnt from the model's info metric at `metrics_url`, where the model publishes its folder).
    """

    client: InferenceServerClient
    model: str
    control_key: str | None = None
    repository: Path | None = None
    metrics_url: str | None = None
    _history: list[int] = field(default_factory=list, init=False, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    @property
    def _headers(self) -> dict[str, str] | None:
        # gRPC names the restricted-protocol header with this prefix (HTTP clients send plain `api-key`).
        return {"triton-grpc-protocol-api-key": self.control_key} if self.control_key else None

    async def status(self) -> VersionsStatus:
        """Every version Triton knows of this model, the policy in force, and the default version."""
        from tritonclient.utils import InferenceServerException

        try:
            index = await self.client.get_model_repository_index(headers=self._headers, as_json=True)
            config = (await self.client.get_model_config(self.model, as_json=True))["config"]
        except InferenceServerException as exc:
            raise ModelLoadError(f"Triton refused the repository API: {exc.message()}") from None
        infos = await self._info_labels()
        states = []
        for entry in index.get("models", []):
            if entry.get("name") != self.model or not str(entry.get("version", "")).isdigit():
                continue
            version = int(entry["version"])
            labels = infos.get(version, {}) if entry.get("state") == "READY" else {}
            states.append(
                VersionState(
                    version=version,
                    state=str(entry.get("state", "UNKNOWN")),
                    reason=str(entry.get("reason", "")),
                    model_name=labels.get("model_name", ""),
                    model_path=labels.get("model_path", ""),
                    supports_images=labels.get("supports_images") == "True",
                )
            )
        states = _without_removed(states, infos, self.repository)
        states.sort(key=lambda s: s.version)
        ready = [s.version for s in states if s.state == "READY"]
        default = max(ready) if ready else None
        if not self._history and default is not None:
            self._history.append(default)
        return VersionsStatus(
            model=self.model,
            policy=dict(config.get("version_policy", {})),
            default_version=default,
            versions=tuple(states),
            history=tuple(self._history),
        )

    async def serve(self, versions: list[int]) -> VersionsStatus:
        """Load exactly `versions` (policy `specific`); the highest answers unversioned requests.

        All-or-nothing: if one fails, ModelLoadError says why and the versions serving before keep serving.
        """
        if not versions:
            raise InvalidRequestError("name at least one version to serve")
        async with self._lock:
            return await self._load(sorted(set(versions)))

    async def activate(self, version: int) -> VersionsStatus:
        """Make `version` the only one served (so the default); the previous one finishes its requests, unloads."""
        async with self._lock:
            status = await self._load([version])
            if not self._history or self._history[-1] != version:
                self._history.append(version)
            return status

    async def rollback(self) -> VersionsStatus:
        """Activate the version that was the default before the last activation by this process."""
        async with self._lock:
            if not self._history:
                await self.status()
            if len(self._history) < 2:
                raise NotFoundError("no earlier version to roll back to (none was activated after it)")
            target = self._history[-2]
            status = await self._load([target])
            self._history.pop()
            return status

    async def add(self, changes: Mapping[str, Any], *, activate: bool = True) -> tuple[int, VersionsStatus]:
        """Write a new version pinning `changes` (settings) and, by default, activate it.

        MODEL_PATH, when not in `changes`, is pinned to what the default version serves (the /load_model rule: unset
        fields keep their current values). A version that fails to load is deleted again and raises ModelLoadError
        with Triton's reason; the serving version is untouched. A MODEL_PATH that is not a loadable checkpoint
        (relative, `..`, no config.json, unreadable weights) or an engine whose package is missing is refused before
        anything is written (`repository.preflight`): Triton 2.51 remembers every version that failed to load.
        """
        pinned = pinned_settings(changes)
        await asyncio.to_thread(preflight, pinned)
        async with self._lock:
            model_dir = await self.model_folder()
            if "MODEL_PATH" not in pinned:
                current = await self.status()
                served = next((v for v in current.versions if v.version == current.default_version), None)
                if served is not None and served.model_path:
                    pinned["MODEL_PATH"] = served.model_path
            version = await asyncio.to_thread(write_version, model_dir, pinned)
            if not activate:
                return version, await self.status()
            try:
                status = await self._load([version])
            except Exception:  # refused, or Triton unreachable mid-load: the folder must not outlive the attempt
                await asyncio.to_thread(remove_version, model_dir, version)
                raise
            self._history.append(version)
            return version, status

    async def model_folder(self) -> Path:
        """The model folder Triton serves, if this process can write to it (ModelLoadError saying why not)."""
        folder = self.repository
        if folder is None:
            labels = await self._info_labels()
            found = [lab.get("repository", "") for lab in labels.values() if lab.get("repository")]
            if not found:
                raise VersionsUnavailable(
                    f"cannot tell where Triton's {self.model!r} folder is (its info metric names none): "
                    "versions can only be added on the machine that serves them"
                )
            folder = Path(found[0])
        folder = folder.resolve()
        if not folder.is_dir():
            raise VersionsUnavailable(f"Triton's model folder {folder} is not reachable from this process")
        if folder.is_relative_to(SOURCE_REPOSITORY):
            raise VersionsUnavailable(f"Triton serves the source tree's repository {folder}, which is never written")
        return folder

    # ------------------------------------------------------------------------------------------------ internals
    async def _load(self, versions: list[int]) -> VersionsStatus:
        from tritonclient.utils import InferenceServerException

        if not self._history:
            await self.status()  # records the default before this load, so rollback can return to it
        config = (await self.client.get_model_config(self.model, as_json=True))["config"]
        config["version_policy"] = {"specific": {"versions": versions}}
        log.info("loading %s versions %s", self.model, versions)
        try:
            await self.client.load_model(
                self.model, headers=self._headers, config=json.dumps(config), client_timeout=LOAD_TIMEOUT
            )
        except InferenceServerException as exc:
            raise ModelLoadError(load_reason(str(exc.message()), versions)) from None
        return await self.status()

    async def _info_labels(self) -> dict[int, dict[str, str]]:
        """The newest `dsa_triton_model_info` labels of each version at 1 ({} when metrics are unreachable)."""
        if not self.metrics_url:
            return {}
        try:
            text = await asyncio.to_thread(fetch_metrics_text, self.metrics_url)
        except OSError as exc:
            log.warning("cannot read Triton metrics at %s: %s", self.metrics_url, exc)
            return {}
        newest: dict[int, dict[str, str]] = {}
        for labels, value in parse_samples(text, INFO_METRIC):
            version = labels.get("version", "")
            if labels.get("model") != self.model or value != 1 or not version.isdigit():
                continue
            known = newest.get(int(version))
            if known is None or float(labels.get("loaded_at", 0)) > float(known.get("loaded_at", 0)):
                newest[int(version)] = labels
        return newest


def _without_removed(
    states: list[VersionState], infos: dict[int, dict[str, str]], repository: Path | None
) -> list[VersionState]:
    """Drop versions that are not READY and whose folder is gone: a failed `add()` removes its folder, but Triton
    2.51 keeps the failed record (UNAVAILABLE) until that number loads again; it is no version of this model."""
    folder = repository or next((Path(lab["repository"]) for lab in infos.values() if lab.get("repository")), None)
    if folder is None or not folder.is_dir():
        return states
    return [s for s in states if s.state == "READY" or (folder / str(s.version)).is_dir()]


def load_reason(message: str, versions: list[int] | None = None) -> str:
    """Triton's load error, without its boilerplate: the engine's own message when present."""
    missing = "at least one version must be available" in message or "directory is not present" in message
    if versions is not None and missing:
        return f"no version folder {versions} in Triton's model repository ({message.strip()})"
    for marker in ("ModelLoadError: ", "Internal: "):
        if marker in message:
            message = message.split(marker, 1)[1]
    return message.split("\n\nAt:")[0].strip()
