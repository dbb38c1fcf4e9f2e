"""Three FastAPI replicas sharing one PostgreSQL behind the project's nginx config (round-robin): the door is
stateless. Each replica runs the embedded SmolLM2 in-process on the ONNX int4 engine (~0.5-0.7 GB, ready in
seconds), so no Triton is needed; a shared Triton would behave the same for what is tested here (the store)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.devtools.pg_cluster import PgCluster
from tests.deploy.deploy_helpers import nginx_files, require_tool, stop_process, wait_http
from tests.serving.live import ROOT, ServerProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

ALICE, BOB = "alice-replica-key", "bob-replica-key"
AUTH = {"Authorization": f"Bearer {ALICE}"}


@dataclass
class Replicas:
    url: str  # nginx
    servers: list[ServerProcess]


def keys_file(path: Path) -> Path:
    rows = [("alice", ALICE, "max_concurrent = 2\n"), ("bob", BOB, "")]
    path.write_text("".join(
        f'[[keys]]\nname = "{n}"\nrole = "learner"\nsha256 = "{hashlib.sha256(k.encode()).hexdigest()}"\n{x}\n'
        for n, k, x in rows
    ))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def replicas(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    logs = tmp_path_factory.mktemp("replicas")
    url = pg_cluster.create_database("replicas")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_KEYS", "MODEL_PATH", "HISTORY_DB"))} | {
        "PYTHONPATH": str(ROOT),
        "LOADING_STRATEGY": "onnx",
        "QUANTIZATION_TYPE": "int4",
        "TEMPERATURE": "0",
        "MAX_NEW_TOKENS": "512",
        "HISTORY_DB": url,
        "API_KEYS_FILE": str(keys_file(logs / "keys.toml")),
        "STORE_POOL_SIZE": "4",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    servers = [ServerProcess(env, logs / f"replica-{i}.log") for i in range(3)]
    prefix = logs / "nginx"
    listen = f"127.0.0.1:{free_port()}"
    try:
        for server in servers:  # start all three, then wait: they load in parallel
            _spawn(server)
        for server in servers:
            _wait_ready(server)
        # The project's nginx.conf, its one fastapi upstream server replaced by the three replicas (round-robin).
        upstreams = ";\n        server ".join(f"127.0.0.1:{s.port}" for s in servers)
        _, args = nginx_files(prefix, listen, upstreams, "127.0.0.1:9", foreground=True)
        with open(prefix / "nginx.log", "wb") as out:
            nginx = subprocess.Popen([require_tool("nginx"), *args], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://{listen}/nginx-health", 20, nginx, prefix / "nginx.log")
            yield Replicas(f"http://{listen}", servers)
        finally:
            stop_process(nginx)
    finally:
        for server in servers:
            server.stop()


def _spawn(server: ServerProcess) -> None:
    cmd = [sys.executable, "-m", "agent.cli", "serve", "--host", "127.0.0.1", "--port", str(server.port)]
    with open(server.log_path, "ab") as log:
        server.proc = subprocess.Popen(cmd, cwd=ROOT, env=server.env, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(server: ServerProcess, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc is not None and server.proc.poll() is None, f"replica exited:\n{server.log()[-3000:]}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"replica not ready:\n{server.log()[-3000:]}")


def chats_served(server: ServerProcess) -> float:
    """How many /chat requests this replica answered (its own /metrics)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.findall(r'dsa_requests_total\{route="/chat",status="200"\} ([0-9.]+)', text)
    return float(found[0]) if found else 0.0


def live(replicas: Replicas) -> list[ServerProcess]:
    return [s for s in replicas.servers if s.proc is not None and s.proc.poll() is None]


async def test_a_conversation_across_replicas_keeps_its_order(replicas: Replicas) -> None:
    before = [chats_served(s) for s in replicas.servers]
    async with httpx.AsyncClient(base_url=replicas.url, timeout=120, headers=AUTH) as client:
        session = (await client.post("/sessions")).json()["session_id"]
        for turn in range(10):
            body = {"message": f"turn {turn}: hi", "session_id": session, "max_new_tokens": 8}
            answer = await client.post("/chat", json=body)
            assert answer.status_code == 200, answer.text
        history = (await client.get("/history", params={"session_id": session})).json()["history"]
    served = [chats_served(s) - b for s, b in zip(replicas.servers, before, strict=True)]
    assert sum(served) == 10 and sum(n > 0 for n in served) >= 2, served  # the turns landed on several replicas
    assert [t["content"] for t in history[::2]] == [f"turn {i}: hi" for i in range(10)]
    assert [t["role"] for t in history] == ["user", "assistant"] * 10


async def test_concurrent_writers_on_two_replicas_never_interleave(replicas: Replicas) -> None:
    a, b = replicas.servers[0].url, replicas.servers[1].url  # straight at two replicas, both at once
    # bob: no concurrency limit (alice's is 2)
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {BOB}"}) as client:
        session = (await client.post(f"{a}/sessions")).json()["session_id"]
        sends = [
            client.post(f"{url}/chat", json={"message": f"q{i}", "session_id": session, "max_new_tokens": 2})
            for i, url in enumerate([a, b] * 4)
        ]
        assert all(r.status_code == 200 for r in await asyncio.gather(*sends))
        history = (await client.get(f"{b}/history", params={"session_id": session})).json()["history"]
    assert len(history) == 16
    assert [t["role"] for t in history] == ["user", "assistant"] * 8
    assert sorted(t["content"] for t in history[::2]) == sorted(f"q{i}" for i in range(8))


async def test_per_principal_limit_holds_across_replicas(replicas: Replicas) -> None:
    """alice may run 2 requests at once in all: a third, on any replica, gets 429."""
    urls = [s.url for s in replicas.servers]
    # 512 tokens without stopping at EOS: both still generate while the third arrives; closed unread at the end.
    messages = [{"role": "user", "content": "Tell me a long story about trees."}]
    body = {"messages": messages, "max_tokens": 512, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as client, contextlib.AsyncExitStack() as streams:
        for url in urls[:2]:
            response = await streams.enter_async_context(client.stream("POST", f"{url}/v1/chat/completions", json=body))
            assert response.status_code == 200
        third = await client.post(f"{urls[2]}/chat", json={"message": "hi", "max_new_tokens": 2})
        assert third.status_code == 429 and "PRINCIPAL_MAX_CONCURRENT" in third.text
        bob = await client.post(
            f"{urls[2]}/chat", json={"message": "hi", "max_new_tokens": 2}, headers={"Authorization": f"Bearer {BOB}"}
        )
        assert bob.status_code == 200


def test_kill_9_of_a_replica_mid_stream_loses_nothing_acknowledged(replicas: Replicas) -> None:
    victim = replicas.servers[2]
    with httpx.Client(timeout=120, headers=AUTH) as client:
        session = client.post(f"{victim.url}/sessions").json()["session_id"]
        first = {"message": "acknowledged turn", "session_id": session, "max_new_tokens": 8}
        done = client.post(f"{victim.url}/chat", json=first)
        assert done.status_code == 200
        body = {"message": "Tell me a long story.", "session_id": session, "stream": True, "max_new_tokens": 512}
        with client.stream("POST", f"{victim.url}/chat", json=body) as stream:
            assert stream.status_code == 200
            reading = stream.iter_lines()
            lines = [next(reading)]  # it is generating
            assert victim.proc is not None
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait(10)
            with contextlib.suppress(httpx.HTTPError):
                lines += reading
        acknowledged = any('"done": true' in line or '"done":true' in line for line in lines)
        # through nginx: the dead replica is skipped, every request succeeds on the others
        for turn in range(4):
            after = {"message": f"after {turn}", "session_id": session, "max_new_tokens": 8}
            answer = client.post(f"{replicas.url}/chat", json=after)
            assert answer.status_code == 200, answer.text
        history = client.get(f"{replicas.url}/history", params={"session_id": session}).json()["history"]
    users = [t["content"] for t in history if t["role"] == "user"]
    cut = "Tell me a long story."
    assert [u for u in users if u != cut] == ["acknowledged turn"] + [f"after {i}" for i in range(4)]
    assert (cut in users) >= acknowledged  # acknowledged -> stored; a turn cut mid-answer is never stored half
    assert [t["role"] for t in history] == ["user", "assistant"] * len(users)
