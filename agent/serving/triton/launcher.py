"""`dsa-agent triton`: run the real Triton Inference Server (bundled in nvidia-pytriton) over our model repository.

What makes the bundled 2.51 server work on CPU here (measured, see docs/environment.md):
- the python-backend stub for this Python is copied beside `libtriton_python.so` (`prepare_server`, idempotent);
- the venv's `bin` comes first on PATH (the stub finds its interpreter as `python3` on PATH; PYTHONPATH is ignored);
- LD_LIBRARY_PATH starts with the base interpreter's lib dir (else the stub may bind an older system libpython);
- `--disable-auto-complete-config` (each python model is otherwise started twice);
- the server runs in its own process group: a stub can outlive a killed server, so stopping ends the whole group.

With `runtime_repository` set (`dsa-agent triton` and `make run` set it: NEWBIE_TRITON_REPOSITORY, default
var/triton-models) the server serves a copy of the source repository made at start, so versions can be added at
run time (agent.serving.triton.versions) without ever writing the source tree.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from agent.config import Settings, load_settings

# The model drains (refuses new requests, finishes or cancels in-flight ones) once the file this names exists;
# `TritonServer.begin_drain()` creates it before the server is signalled.
from agent.serving.triton.admission import DRAIN_FILE_ENV, instances_drained, instances_live

log = logging.getLogger(__name__)

MODEL_REPOSITORY = Path(__file__).resolve().parents[1] / "triton-models"
REPO_ROOT = Path(__file__).resolve().parents[3]
# model.py reads it to import `agent` when the project is not pip-installed (the stub ignores PYTHONPATH).
ROOT_ENV = "NEWBIE_APP_ROOT"
# Where the launcher copies the model repository it serves (versions are added there at run time).
RUNTIME_REPOSITORY_ENV = "NEWBIE_TRITON_REPOSITORY"
DEFAULT_RUNTIME_REPOSITORY = Path("var/triton-models")
# Seconds Triton may take to exit beyond GRACEFUL_SHUTDOWN_SECONDS: the engine's own shutdown (vLLM 11-13 s on CPU).
EXIT_MARGIN = 20
# Seconds tritonserver may take to start unloading (finalize) a model instance that has drained and stopped its
# engine (1-2 s measured). 2.51 can keep a model loaded after a cancelled gRPC stream (a race in its gRPC front end,
# fixed upstream in 25.04) and would wait out its whole exit timeout: past this, the launcher ends it.
DRAINED_EXIT_MARGIN = 4.0


def runtime_repository_from_env() -> Path:
    """NEWBIE_TRITON_REPOSITORY, else var/triton-models (relative to the working directory, like HISTORY_DB)."""
    raw = os.environ.get(RUNTIME_REPOSITORY_ENV, "").strip()
    return Path(raw).expanduser().resolve() if raw else DEFAULT_RUNTIME_REPOSITORY.resolve()


class TritonLaunchError(RuntimeError):
    """The server could not be found, prepared, or did not become ready."""


def pytriton_dir() -> Path:
    """Where nvidia-pytriton is installed (found without importing it: its __init__ needs extra packages)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonLaunchError("nvidia-pytriton is not installed: pip install --no-deps nvidia-pytriton==0.7.0")
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def prepare_server() -> str:
    """Copy the python-backend stub for this interpreter beside the backend library (once); return the binary path."""
    base = pytriton_dir()
    binary = base / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonLaunchError(f"tritonserver binary missing: {binary}")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub_src = base / "python_backend_stubs" / version / "triton_python_backend_stub"
    stub_dst = base / "backends" / "python" / "triton_python_backend_stub"
    if not stub_src.is_file():
        raise TritonLaunchError(f"no python-backend stub for Python {version} in {stub_src.parent.parent}")
    if not stub_dst.is_file() or stub_dst.stat().st_size != stub_src.stat().st_size:
        tmp = stub_dst.with_name(stub_dst.name + f".tmp-{os.getpid()}")
        shutil.copyfile(stub_src, tmp)
        tmp.chmod(0o755)
        tmp.replace(stub_dst)  # atomic: concurrent prepares never leave a half-written stub
        log.info("installed the python-backend stub for Python %s", version)
    return str(binary)


def _split(url: str, default_port: int) -> tuple[str, int]:
    host, _, port = url.rpartition(":") if ":" in url else (url, "", str(default_port))
    return host or "127.0.0.1", int(port)


@dataclass
class TritonConfig:
    """Where the server listens and what it serves."""

    http_address: str = "127.0.0.1"
    http_port: int = 8001
    grpc_address: str = "127.0.0.1"
    grpc_port: int = 8002
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 8003
    model_repository: Path = MODEL_REPOSITORY
    # Set: serve a copy of `model_repository` made here at start (versions can be added to it); None: serve the
    # source as it is (tests; versions can then only be activated, not added).
    runtime_repository: Path | None = None
    models: tuple[str, ...] = ("qwen3-vl",)
    log_verbose: int = 0
    # Seconds Triton waits at exit for its connections and models to finish: the model drains for
    # GRACEFUL_SHUTDOWN_SECONDS, then cancels what is left, so this only bounds a model that hangs.
    exit_timeout: int = 30 + EXIT_MARGIN
    # API_KEYS set: Triton's model-control (repository) API needs the header `api-key: <first key>` (HTTP and gRPC).
    control_key: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls) -> TritonConfig:
        """Addresses from TRITON_HTTP_URL, TRITON_GRPC_URL and TRITON_METRICS_PORT."""
        s = load_settings()
        http_host, http_port = _split(s.triton_http_url, 8001)
        grpc_host, grpc_port = _split(s.triton_grpc_url, 8002)
        return cls(
            http_address=http_host,
            http_port=http_port,
            grpc_address=grpc_host,
            grpc_port=grpc_port,
            metrics_address=http_host,
            metrics_port=s.triton_metrics_port,
            models=(s.triton_model_name,),
            control_key=control_key(s),
            runtime_repository=runtime_repository_from_env(),
            exit_timeout=exit_timeout_for(s.graceful_shutdown_seconds),
        )

    @property
    def served_repository(self) -> Path:
        """The repository the server is started on."""
        return self.runtime_repository or self.model_repository

    @property
    def http_url(self) -> str:
        return f"{self.http_address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.grpc_address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_address}:{self.metrics_port}/metrics"


def exit_timeout_for(grace: float) -> int:
    """Triton's --exit-timeout-secs for a drain of `grace` seconds (GRACEFUL_SHUTDOWN_SECONDS)."""
    return math.ceil(grace) + EXIT_MARGIN


def control_key(settings: Settings) -> str | None:
    """The key guarding Triton's model-control API: the first of API_KEYS (None: unguarded)."""
    secret = getattr(settings, "api_keys", None)
    if secret is None:
        return None
    keys = [k.strip() for k in secret.get_secret_value().split(",") if k.strip()]
    return keys[0] if keys else None


def server_command(cfg: TritonConfig, binary: str) -> list[str]:
    """The tritonserver command line: explicit model control, our models loaded at start."""
    backends = Path(binary).parents[1] / "backends"
    cmd = [
        binary,
        f"--model-repository={cfg.served_repository}",
        f"--backend-directory={backends}",
        f"--cache-directory={backends.parent / 'caches'}",
        f"--http-address={cfg.http_address}",
        f"--http-port={cfg.http_port}",
        f"--grpc-address={cfg.grpc_address}",
        f"--grpc-port={cfg.grpc_port}",
        f"--metrics-address={cfg.metrics_address}",
        f"--metrics-port={cfg.metrics_port}",
        "--allow-metrics=true",
        "--disable-auto-complete-config",
        "--model-control-mode=explicit",
        f"--log-verbose={cfg.log_verbose}",
        f"--exit-timeout-secs={cfg.exit_timeout}",
        # /v2/health/ready = the server is up and serving. Strict readiness (the default) also wants every version
        # Triton ever tried to be READY, and 2.51 never forgets one that failed to load (a failed version add or
        # repository-API load would leave the server "not ready" until a restart). Models: /v2/models/<m>/ready.
        "--strict-readiness=false",
    ]
    if cfg.control_key:
        cmd += [
            f"--http-restricted-api=model-repository:api-key={cfg.control_key}",
            f"--grpc-restricted-protocol=model-repository:api-key={cfg.control_key}",
        ]
    return cmd + [f"--load-model={m}" for m in cfg.models]


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the server and its stubs need (see the module docstring)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env.setdefault(ROOT_ENV, str(REPO_ROOT))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


class TritonServer:
    """The real server as a context manager: `with TritonServer(cfg) as server:` returns once it is ready."""

    def __init__(self, cfg: TritonConfig | None = None, *, log_path: Path | None = None) -> None:
        self.cfg = cfg or TritonConfig.from_settings()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self._drain_dir: str | None = None

    @property
    def drain_file(self) -> Path | None:
        """The file whose creation tells the running model to drain (None before start)."""
        return Path(self._drain_dir) / "drain" if self._drain_dir else None

    def begin_drain(self) -> None:
        """Tell the model to refuse new requests and finish (or, after GRACEFUL_SHUTDOWN_SECONDS, cancel) the ones
        in flight. Triton itself waits for open requests before it unloads anything, so `stop()` starts here."""
        if self.drain_file is not None and self.drain_file.parent.is_dir():
            self.drain_file.touch()

    def start(self, timeout: float = 300.0) -> TritonServer:
        """Start the server in its own process group and wait until the model is ready."""
        binary = prepare_server()
        if self.cfg.runtime_repository is not None:
            from agent.engine.errors import ModelLoadError
            from agent.serving.triton.repository import prepare_runtime_repository

            try:
                prepare_runtime_repository(self.cfg.model_repository, self.cfg.runtime_repository)
            except ModelLoadError as exc:
                raise TritonLaunchError(exc.message) from None
        cmd = server_command(self.cfg, binary)
        shown = [a.split("api-key=")[0] + "api-key=***" if "api-key=" in a else a for a in cmd]
        log.info("starting Triton: %s", " ".join(shown))
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._drain_dir = tempfile.mkdtemp(prefix="newbie-triton-")
        self.process = subprocess.Popen(
            cmd,
            env=server_env({**self.cfg.extra_env, DRAIN_FILE_ENV: str(self.drain_file)}),
            stdout=self._log_file,
            stderr=subprocess.STDOUT if self._log_file else None,
            start_new_session=True,  # setsid: stop() ends stubs too
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        base = f"http://{self.cfg.http_url}"
        urls = [f"{base}/v2/health/ready", *(f"{base}/v2/models/{m}/ready" for m in self.cfg.models)]
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonLaunchError(f"tritonserver exited with code {self.process.returncode} (see its log)")
            if all(_answers_200(url) for url in urls):
                log.info("Triton ready on %s (gRPC %s)", self.cfg.http_url, self.cfg.grpc_url)
                return
            time.sleep(0.5)
        raise TritonLaunchError(f"Triton not ready after {timeout:.0f} s")

    def stop(self, timeout: float | None = None) -> None:
        """Drain the model, TERM the server, then TERM/KILL its process group (a stub can outlive the server)."""
        timeout = self.cfg.exit_timeout + 15.0 if timeout is None else timeout
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                self.begin_drain()
                proc.send_signal(signal.SIGTERM)
                self._wait_for_exit(proc, timeout)
            _end_group(proc.pid)
            proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._drain_dir is not None:
            shutil.rmtree(self._drain_dir, ignore_errors=True)
            self._drain_dir = None

    def _wait_for_exit(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Wait for the signalled server; end its group (SIGKILL: nothing is left to lose) if its model instances
        drained and stopped their engines but Triton has not begun to unload them DRAINED_EXIT_MARGIN s later, or
        after `timeout` s."""
        deadline = time.monotonic() + timeout
        drained_at: float | None = None
        while proc.poll() is None:
            now = time.monotonic()
            drain_file = self.drain_file
            if drained_at is None and drain_file is not None and instances_drained(drain_file):
                drained_at = now
            if drained_at is not None and drain_file is not None and not instances_live(drain_file):
                drained_at = None  # every instance is being finalized: Triton is unloading, exiting normally
            if drained_at is not None and now - drained_at > DRAINED_EXIT_MARGIN:
                log.warning(
                    "tritonserver has not unloaded its model %.0f s after it drained and stopped its engine "
                    "(2.51 keeps a model loaded after some cancelled gRPC streams): ending it",
                    DRAINED_EXIT_MARGIN,
                )
                break
            if now > deadline:
                log.warning("tritonserver did not stop in %.0f s: killing its group", timeout)
                break
            time.sleep(0.1)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _end_group(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    defaults = TritonConfig.from_settings()
    p = argparse.ArgumentParser(prog="dsa-agent triton", description="Start the Triton door (python backend).")
    p.add_argument("--http-address", default=defaults.http_address)
    p.add_argument("--http-port", type=int, default=defaults.http_port)
    p.add_argument("--grpc-address", default=defaults.grpc_address)
    p.add_argument("--grpc-port", type=int, default=defaults.grpc_port)
    p.add_argument("--metrics-address", default=defaults.metrics_address)
    p.add_argument("--metrics-port", type=int, default=defaults.metrics_port)
    p.add_argument("--model-repository", type=Path, default=defaults.model_repository)
    p.add_argument(
        "--runtime-repository",
        type=Path,
        default=defaults.runtime_repository,
        help=f"the copy Triton serves and versions are added to (env {RUNTIME_REPOSITORY_ENV})",
    )
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the model to be ready")
    return p.parse_args(list(argv))


def config_from_args(args: argparse.Namespace) -> TritonConfig:
    return TritonConfig(
        http_address=args.http_address,
        http_port=args.http_port,
        grpc_address=args.grpc_address,
        grpc_port=args.grpc_port,
        metrics_address=args.metrics_address,
        metrics_port=args.metrics_port,
        model_repository=args.model_repository,
        runtime_repository=args.runtime_repository,
        models=(load_settings().triton_model_name,),
        log_verbose=args.log_verbose,
        control_key=control_key(load_settings()),
    )


def main(argv: Sequence[str]) -> int:
    """Run Triton in the foreground until Ctrl-C / SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    server = TritonServer(config_from_args(args))
    stop = _install_stop_handlers()
    try:
        server.start(args.timeout)
        cfg = server.cfg
        log.info("Triton door: HTTP %s  gRPC %s  metrics %s", cfg.http_url, cfg.grpc_url, cfg.metrics_url)
        while not stop() and server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        return 0 if stop() else 1
    except TritonLaunchError as exc:
        log.error("%s", exc)
        return 1
    finally:
        server.stop()


def _install_stop_handlers() -> Callable[[], bool]:
    """SIGTERM/SIGINT set a flag the main loop polls (so the server is stopped in `finally`)."""
    flag = {"stop": False}

    def _handler(signum: int, frame: object) -> None:
        flag["stop"] = True

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return lambda: flag["stop"]
