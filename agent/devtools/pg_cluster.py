"""A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's `postgresql` package) for tests and `make bench`.

`initdb` refuses to run as root, so as root the cluster's folder is given to the `postgres` user and every server
command runs through `runuser -u postgres`. Authentication is `trust` on loopback only; the folder is deleted by
`destroy`. Install the package with deploy/install-tools.sh (`make test` runs it).
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

INSTALL_HINT = "PostgreSQL not found: run deploy/install-tools.sh (apt-get install postgresql; make test runs it)"


def postgres_bin() -> Path:
    """The newest installed /usr/lib/postgresql/<version>/bin (Debian's layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise FileNotFoundError(INSTALL_HINT)
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgCluster:
    """`start()` creates and starts a cluster; `stop()`/`start()` again simulate an outage; `destroy()` removes it."""

    port: int = field(default_factory=_free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="newbie-pg-")))
    bin: Path = field(default_factory=postgres_bin)
    durable: bool = False  # tests: fsync off (fast, nothing to keep); benchmarks: on, as in production

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self, timeout: float = 60) -> PgCluster:
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o700)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
        options += "" if self.durable else " -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                  "-t", str(int(timeout)), "start")  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
            )
            if ready.returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL on port {self.port} not ready after {timeout} s:\n{self.log()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: disconnect clients; `immediate`: as if it crashed)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        """Create a database (a fresh one per test) and return its URL."""
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q", "-c",
                  f'CREATE DATABASE "{name}"')  # fmt: skip
        return self.url_for(name)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log.warning("stopping the test cluster: %s", exc)
        shutil.rmtree(self.root, ignore_errors=True)
