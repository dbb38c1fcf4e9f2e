"""The Triton clients and `dsa-agent chat` against the real Triton server serving the embedded SmolLM2.

The seed's snippets are run as they are written in the guide, with one change: the guide hard-codes
localhost:8001 / localhost:8002, and the test server listens on free ports, so the port number is substituted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client.errors import InvalidInputError, ModelNotFoundError
from agent.client.triton_client import TritonGrpcClient, TritonHttpClient

pytestmark = [pytest.mark.slow, pytest.mark.triton]

REPO = Path(__file__).resolve().parents[2]

# --- the seed's snippets (the Triton integration guide), verbatim -----------------------------------------------
SEED_HTTP = """
from agent.client.triton_client import TritonHttpClient

client = TritonHttpClient("localhost:8001")

if client.check_health():
    response, response_time = client.chat("What is a data structure?")
    print(f"Response: {response}")
    print(f"Time: {response_time:.2f}s")
"""

SEED_BATCH = """
from agent.client.triton_client import TritonHttpClient
import concurrent.futures

client = TritonHttpClient("localhost:8001")

messages = [
    "What is a tree?",
    "What is a graph?",
    "What is a hash table?"
]

with concurrent.futures.ThreadPoolExecutor(max_workers=3) as executor:
    futures = [executor.submit(client.chat, msg) for msg in messages]
    results = [f.result() for f in concurrent.futures.as_completed(futures)]

for msg, (response, time) in zip(messages, results):
    print(f"Q: {msg}")
    print(f"A: {response}\\n")
"""

SEED_GRPC = """
from agent.client.triton_client import TritonGrpcClient

client = TritonGrpcClient("localhost:8002")  # gRPC port
response, response_time = client.chat("Explain quicksort")
print(f"Response (gRPC): {response_time:.3f}s")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prompt_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Triton backend's debug log of rendered prompts (NEWBIE_TRITON_PROMPT_LOG), one JSON line per request."""
    return tmp_path_factory.mktemp("triton") / "prompts.jsonl"


@pytest.fixture(scope="module")
def triton(smollm_folder: Path, prompt_log: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Real Triton on free ports, serving SmolLM2 greedily (deterministic) with short answers."""
    from agent.serving.triton.launcher import TritonConfig, TritonServer

    env = {
        "MODEL_PATH": str(smollm_folder),
        "LOADING_STRATEGY": "transformers",
        "DTYPE": "float32",
        "QUANTIZATION_TYPE": "none",
        "TEMPERATURE": "0",
        "MAX_NEW_TOKENS": "16",  # also the upper bound: keeps every answer short
        "NEWBIE_TRITON_PROMPT_LOG": str(prompt_log),
    }
    cfg = TritonConfig(http_port=_free_port(), grpc_port=_free_port(), metrics_port=_free_port(), extra_env=env)
    log_path = tmp_path_factory.mktemp("triton-log") / "triton.log"
    with TritonServer(cfg, log_path=log_path) as server:
        yield server


def _run_seed(snippet: str, port: int, seed_port: int) -> str:
    code = snippet.replace(f"localhost:{seed_port}", f"localhost:{port}")
    assert code != snippet, "the snippet must name the seed's port"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<seed snippet>", "exec"), {"__name__": "seed_snippet"})
    return out.getvalue()


def test_seed_http_example(triton) -> None:
    out = _run_seed(SEED_HTTP, triton.cfg.http_port, 8001)
    lines = out.splitlines()
    assert lines[0].startswith("Response: ") and len(lines[0]) > len("Response: ") + 10
    assert lines[-1].startswith("Time: ") and float(lines[-1][6:-1]) > 0


def test_seed_batch_example_with_a_thread_pool(triton) -> None:
    out = _run_seed(SEED_BATCH, triton.cfg.http_port, 8001)
    assert out.count("Q: What is") == 3
    answers = [line for line in out.splitlines() if line.startswith("A: ")]
    assert len(answers) == 3 and all(len(a) > 10 for a in answers)


def test_seed_grpc_example(triton) -> None:
    out = _run_seed(SEED_GRPC, triton.cfg.grpc_port, 8002)
    assert out.startswith("Response (gRPC): ") and out.strip().endswith("s")


def test_demo_script(triton) -> None:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "agent/client/triton_client.py", "--url", triton.cfg.http_url, "--max-new-tokens", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr
    assert "is ready" in proc.stdout and "Response: " in proc.stdout and "Time: " in proc.stdout


@pytest.mark.parametrize("cls", [TritonHttpClient, TritonGrpcClient], ids=["http", "grpc"])
def test_follow_up_carries_the_earlier_turns(cls: type, triton, prompt_log: Path) -> None:
    url = triton.cfg.http_url if cls is TritonHttpClient else triton.cfg.grpc_url
    with cls(url, timeout=300) as client:
        first = client.complete("What is a stack?", max_new_tokens=12)
        follow = client.complete("Give an example.", max_new_tokens=12)
        alone = client.complete("Give an example.", max_new_tokens=12, use_history=False)
        assert [t.content for t in client.history] == ["What is a stack?", first.text, "Give an example.", follow.text]
        client.clear_history()
        assert client.history == []
    # The model saw the first question and answer: the backend's rendered prompt contains them ...
    prompts = [json.loads(line)["prompt"] for line in prompt_log.read_text().splitlines()]
    follow_prompt = next(p for p in reversed(prompts) if "Give an example." in p and "What is a stack?" in p)
    assert first.text.strip() in follow_prompt
    # ... and the prompt grew by at least the first exchange's tokens (question + answer).
    assert follow.prompt_tokens >= alone.prompt_tokens + first.completion_tokens + 3


@pytest.mark.parametrize("cls", [TritonHttpClient, TritonGrpcClient], ids=["http", "grpc"])
def test_streaming_yields_the_same_answer_as_chat(cls: type, triton) -> None:
    url = triton.cfg.http_url if cls is TritonHttpClient else triton.cfg.grpc_url
    with cls(url, timeout=300) as client:
        whole = client.complete("What is recursion?", max_new_tokens=16, use_history=False)
        stream = client.stream_chat("What is recursion?", max_new_tokens=16, use_history=False)
        deltas = list(stream)
    assert len(deltas) > 3 and "".join(deltas) == whole.text
    assert stream.result is not None and stream.result.completion_tokens == whole.completion_tokens == 16
    assert stream.result.finish_reason == "length"


@pytest.mark.parametrize("cls", [TritonHttpClient, TritonGrpcClient], ids=["http", "grpc"])
def test_cancelled_stream_leaves_the_client_usable(cls: type, triton) -> None:
    url = triton.cfg.http_url if cls is TritonHttpClient else triton.cfg.grpc_url
    with cls(url, timeout=300) as client:
        stream = client.stream_chat("Tell me a long story about trees.", use_history=False)
        deltas = iter(stream)
        next(deltas)
        started = time.monotonic()
        stream.close()
        assert time.monotonic() - started < 5
        assert stream.result is None and client.history == []
        text, seconds = client.chat("What is a queue?", max_new_tokens=4)
        assert text and seconds > 0


@pytest.mark.parametrize("cls", [TritonHttpClient, TritonGrpcClient], ids=["http", "grpc"])
def test_metadata_errors_and_images(cls: type, triton, tmp_path: Path) -> None:
    from PIL import Image

    url = triton.cfg.http_url if cls is TritonHttpClient else triton.cfg.grpc_url
    with cls(url, timeout=300) as client:
        meta = client.model_metadata()
        assert meta.name == "qwen3-vl" and meta.platform == "python"
        assert {"text_input", "messages", "image", "max_tokens"} <= {t.name for t in meta.inputs}
        assert {"text_output", "finish_reason"} <= {t.name for t in meta.outputs}
        # SmolLM2 cannot see: the server refuses the image (400 unsupported_input), mapped to InvalidInputError.
        path = tmp_path / "dot.png"
        Image.new("RGB", (32, 32), "white").save(path)
        with pytest.raises(InvalidInputError) as info:
            client.chat("What is in this picture?", image=path)
        assert info.value.status == 400 and info.value.code == "unsupported_input"
        assert client.history == []
    with cls(url, timeout=10, model_version="1") as pinned:
        assert pinned.check_health() and pinned.model_metadata().versions == ("1",)
    for missing in (cls(url, timeout=10, model_name="no-such-model"), cls(url, timeout=10, model_version="7")):
        assert missing.check_health() is False
        with pytest.raises(ModelNotFoundError) as not_found:
            missing.chat("hello")
        assert not_found.value.status == 404
        missing.close()


def test_one_client_shared_by_threads_keeps_whole_turns(triton) -> None:
    with TritonGrpcClient(triton.cfg.grpc_url, timeout=300) as client:
        questions = [f"What is {n} plus {n}?" for n in range(4)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            replies = list(pool.map(lambda q: client.chat(q, max_new_tokens=6)[0], questions))
        answers = dict(zip(questions, replies, strict=True))
        turns = client.history
    assert len(turns) == 8
    for user, assistant in zip(turns[::2], turns[1::2], strict=True):
        assert answers[user.content] == assistant.content


def _spawn_chat(door: str, url: str):
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        ["-m", "agent.cli", "chat", "--door", door, "--url", url, "--timeout", "300"],
        cwd=str(REPO),
        encoding="utf-8",
        timeout=300,
        dimensions=(40, 200),
    )
    child.expect_exact("you> ")
    return child


def _interrupt_an_answer(child) -> None:
    """Ask for a long answer, press Ctrl-C once text streams, and check the chat survives."""
    child.sendline("Tell me a long story about a tree.")
    child.expect_exact("bot> ")
    child.expect(r"\w+")  # the first words arrived: the answer is streaming
    child.sendintr()  # Ctrl-C, through the terminal, as a user would
    child.expect_exact("(stopped)")
    child.expect_exact("you> ")
    assert child.isalive()


def test_chat_cli_streams_and_survives_ctrl_c_over_grpc(triton) -> None:
    child = _spawn_chat("triton-grpc", triton.cfg.grpc_url)
    try:
        _interrupt_an_answer(child)
        child.sendline("What is a linked list?")
        child.expect(r"bot> \s*\w")
        first_words = time.monotonic()
        child.expect(r"\[(\d+) tokens, ")
        streamed_for = time.monotonic() - first_words
        assert int(child.match.group(1)) > 8 and streamed_for > 0.2  # pieces arrived over time, not all at once
        child.expect_exact("you> ")
        child.sendline("/history")
        child.expect_exact("user: What is a linked list?")
        child.expect_exact("you> ")
        assert "long story" not in child.before  # the stopped answer was not kept
        child.sendline("/image /no/such/screenshot.png")
        child.expect_exact("error: image: no such file: /no/such/screenshot.png")
        child.sendline("/clear")
        child.expect_exact("(conversation cleared)")
        child.sendline("/history")
        child.expect_exact("(no history)")
        child.expect_exact("you> ")
        child.sendintr()  # Ctrl-C at the prompt leaves
        child.expect(pexpect_eof())
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_chat_cli_over_http_ctrl_d_leaves(triton) -> None:
    child = _spawn_chat("triton-http", triton.cfg.http_url)
    try:
        _interrupt_an_answer(child)
        child.sendeof()  # Ctrl-D at the prompt leaves
        child.expect(pexpect_eof())
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def pexpect_eof() -> type:
    import pexpect

    return pexpect.EOF
