"""The targets of `make bench`: every engine through every door, timed from outside the server over its protocol,
and the peers (llama.cpp's llama-server, `vllm serve`) on the same model, machine, workload and client.

A target is `<door>/<engine>` (e.g. `gateway/onnx_int4`) or a peer's name. Doors:
- `fastapi`: `dsa-agent serve`, the engine in the FastAPI process, OpenAI `/v1/chat/completions`;
- `gateway`: what `make run` starts (`dsa-agent up`): FastAPI `/v1` -> Triton gRPC -> the engine in Triton;
- `triton_http`, `triton_grpc`: Triton's HTTP `generate_stream` and gRPC stream of that same `dsa-agent up`.
Settings shared by all: threads = usable cores (each engine's default), parallel slots = the concurrency level
(llama-server's -np; the others batch up to 32 or more), prefix caching as each ships by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import itertools
import logging
import statistics
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from agent.engine.cpu import CpuFeatures, cpu_features, usable_cores
from bench.load import LevelResult, OpenAIStream, TritonGrpcStream, TritonHttpStream, run_level
from bench.targets import fastapi_door, free_port, stack_door, vllm_serve
from bench.workloads import Workload

log = logging.getLogger("bench")

ENGINES = ("onnx_int4", "onnx_int8", "onnx_fp32", "openvino_int4", "transformers", "vllm")
DOORS = ("fastapi", "gateway", "triton_http", "triton_grpc")
PEERS = ("llama_server", "vllm_serve")
TRITON_MODEL = "qwen3-vl"  # the model repository's name (the seed's), whatever model it serves
LLAMA_CTX_PER_SLOT = 1024  # llama-server splits -c among its -np slots: room for the tutor prompt + 64 tokens


@dataclass
class Plan:
    """How each target is driven: the same for every target of a run."""

    levels: list[int]
    repeats: int
    per_level: int  # requests per client at each level
    tokens: int
    workloads: list[Workload]
    min_requests: int = 4  # at least this many requests per level (`make bench`: 12, so the level-1 medians settle)

    def requests_at(self, concurrency: int) -> int:
        return requests_per_level(self.per_level, concurrency, self.min_requests)


def requests_per_level(per_level: int, concurrency: int, minimum: int) -> int:
    """`per_level` requests per client, and at least `minimum` so a low level's medians rest on enough requests."""
    return max(per_level * concurrency, minimum)


def reserve_prompts(numbers: Iterator[int], count: int) -> int:
    """The first of `count` consecutive prompt numbers, all taken from `numbers`: no later level or arm reuses a
    prompt (no prefix-cache hit between levels), while the arms of one level can send the same prompts."""
    base = next(numbers)
    for _ in range(count - 1):
        next(numbers)
    return base


def fastest_dtype(cpu: CpuFeatures | None = None) -> str:
    """bf16 only where the CPU has it natively (AVX-512 BF16 or AMX); emulated bf16 crawls, so fp32 elsewhere."""
    cpu = cpu_features() if cpu is None else cpu
    return "bfloat16" if cpu.native_bf16 else "float32"


def engine_env(engine: str, dtype: str) -> dict[str, str]:
    """The environment that makes a door serve `engine` (as a user would set it)."""
    if engine.startswith("onnx_"):  # onnx_fp32 is the ONNX engine's build for QUANTIZATION_TYPE=none
        quantization = engine.removeprefix("onnx_").replace("fp32", "none")
        return {"LOADING_STRATEGY": "onnx", "QUANTIZATION_TYPE": quantization}
    if engine.startswith("openvino_"):  # OpenVINO's default compute precision (bf16 only where native)
        return {"LOADING_STRATEGY": "openvino", "QUANTIZATION_TYPE": engine.removeprefix("openvino_")}
    return {"LOADING_STRATEGY": engine, "QUANTIZATION_TYPE": "none", "DTYPE": dtype, "MAX_BATCH_SIZE": "32"}


def weight_format(target: str, dtype: str) -> str:
    """The key of bench.floor.FORMATS (or "gguf") a target's weights are in."""
    engine = target.rsplit("/", 1)[-1]
    if engine == "llama_server":
        return "gguf"
    if engine.startswith(("onnx_", "openvino_")):
        return engine.split("_", 1)[1]
    return "bf16" if dtype == "bfloat16" else "fp32"


def available_engines() -> list[str]:
    """The engines whose runtime is installed here (vLLM, onnxruntime-genai and openvino-genai are optional)."""
    have_onnx = importlib.util.find_spec("onnxruntime_genai") is not None
    have_vllm = importlib.util.find_spec("vllm") is not None
    have_openvino = importlib.util.find_spec("openvino_genai") is not None
    return [
        e
        for e in ENGINES
        if (have_onnx or not e.startswith("onnx"))
        and (have_vllm or e != "vllm")
        and (have_openvino or not e.startswith("openvino"))
    ]


def shipped_engine() -> str:
    """The engine `make run` serves with this environment: LOADING_STRATEGY=auto's choice (model_loader)."""
    from agent.config import LoadingStrategy, load_settings
    from agent.engine.checkpoints import resolve_model
    from agent.serving.model_loader import choose_strategy, engine_spec

    settings = load_settings()
    if settings.loading_strategy is LoadingStrategy.triton:  # FastAPI's gateway setting; Triton runs `auto`
        settings = settings.model_copy(update={"loading_strategy": LoadingStrategy.auto})
    spec = engine_spec(settings, resolved=resolve_model(settings.model_path, settings.model_cache_dir))
    strategy = choose_strategy(settings, spec)
    if strategy is LoadingStrategy.onnx:
        q = spec.quantization.value
        return f"onnx_{'fp32' if q == 'none' else q}"
    return strategy.value


def _median_levels(runs: list[list[LevelResult]]) -> list[dict]:
    """Per concurrency level, the median of each figure over the repeats (errors: the sum)."""
    out = []
    for level_runs in zip(*runs, strict=True):
        row: dict = {"concurrency": level_runs[0].concurrency, "repeats": len(level_runs)}
        for key, value in level_runs[0].as_dict().items():
            if key != "concurrency" and isinstance(value, int | float):
                values = [getattr(r, key) for r in level_runs]
                row[key] = sum(values) if key == "errors" else statistics.median(values)
        out.append(row)
    return out


async def sweep(make_client: Callable[[], object], plan: Plan, levels: list[int], numbers: Iterator[int]) -> list[dict]:
    """`plan.repeats` sweeps over `levels`; medians per level. Request numbers come from `numbers` and are never
    reused within a target, so a repeat or a higher level never meets a prompt a cache has already seen."""
    runs = [await sweep_once(make_client, plan, levels, numbers, rep) for rep in range(plan.repeats)]
    return _median_levels(runs)


async def sweep_once(
    make_client: Callable[[], object], plan: Plan, levels: list[int], numbers: Iterator[int], rep: int = 0
) -> list[LevelResult]:
    """One sweep over `levels` with a new client, after one warm-up request (not counted)."""
    client = make_client()
    try:
        await client(next(numbers))
        results = []
        for c in levels:
            count = plan.requests_at(c)
            base = reserve_prompts(numbers, count)
            result = await run_level(lambda i, b=base, one=client: one(b + i), c, count)
            log.info(
                "  repeat %d  c=%-3d %8.1f tok/s  ttft p50 %7.1f ms  errors %d  client cpu %.2f s",
                rep + 1,
                c,
                result.tok_per_s,
                result.ttft_p50_ms,
                result.errors,
                result.client_cpu_s,
            )
            results.append(result)
        return results
    finally:
        await client.close()


Figures = dict[str, dict[str, list[dict]]]  # workload name -> target -> rows


class TargetFailed(RuntimeError):
    """A server died or did not start: its target is reported as failed and the run goes on with the next."""


def _record(figures: Figures, workload: Workload, target: str, rows: list[dict]) -> None:
    figures.setdefault(workload.name, {})[target] = rows


def _check_alive(proc: subprocess.Popen, target: str, log_path: Path) -> None:
    if proc.poll() is not None:
        raise TargetFailed(f"{target}: the server exited with {proc.returncode} (see {log_path})")


@dataclass
class Timed:
    """A running server and how to time it: `client_for(workload)` makes the client factory for one sweep."""

    target: str
    client_for: Callable[[Workload], Callable[[], object]]
    proc: subprocess.Popen
    log_path: Path


def _time_servers(figures: Figures, plan: Plan, servers: list[Timed], failures: list[str]) -> None:
    """Every workload against servers that run side by side, their sweeps interleaved (A B, then B A, ...): on a
    shared machine the load drifts over minutes, and timed one after the other the door compared second got
    other minutes (the in-process door measured 159, 181 and 199 tok/s at 32 in three sweeps in a row). A server
    that dies fails its target (its figures, taken while it was crashing, are not kept); the others go on."""
    live = list(servers)
    for workload in plan.workloads:
        numbers = {s.target: itertools.count() for s in live}
        runs: dict[str, list[list[LevelResult]]] = {s.target: [] for s in live}
        for rep in range(plan.repeats):
            for server in live if rep % 2 == 0 else live[::-1]:
                log.info("%s, workload %s, repeat %d", server.target, workload.name, rep + 1)
                try:
                    _check_alive(server.proc, server.target, server.log_path)
                    make_client = server.client_for(workload)
                    runs[server.target].append(
                        asyncio.run(sweep_once(make_client, plan, plan.levels, numbers[server.target], rep))
                    )
                    _check_alive(server.proc, server.target, server.log_path)
                except TargetFailed as exc:
                    _failed(failures, server.target, exc)
                    runs.pop(server.target)
            live = [s for s in live if s.target in runs]
        for target, target_runs in runs.items():
            _record(figures, workload, target, _median_levels(target_runs))


def run_doors(
    engine: str, doors: list[str], plan: Plan, model: str, dtype: str, logs: Path, failures: list[str]
) -> Figures:
    """`engine` behind each asked door: one `dsa-agent serve` for `fastapi`, one `dsa-agent up` for the rest, both
    running while their doors are timed in turn. A server that fails is recorded in `failures` and the other doors
    still run."""
    figures: Figures = {}
    env = engine_env(engine, dtype)
    tokens = plan.tokens
    servers: list[Timed] = []
    with contextlib.ExitStack() as running:
        if "fastapi" in doors:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log_path = logs / f"fastapi-{engine}.log"
            try:
                proc = running.enter_context(fastapi_door(port, env, log_path))
                client_for = functools.partial(_openai_client_for, url, model, tokens)
                servers.append(Timed(f"fastapi/{engine}", client_for, proc, log_path))
            except (RuntimeError, TimeoutError) as exc:
                _failed(failures, f"fastapi/{engine}", exc)
        stack = [d for d in doors if d != "fastapi"]
        if stack:
            port, http, grpc, metrics = free_port(), free_port(), free_port(), free_port()
            url, http_url, grpc_url = f"http://127.0.0.1:{port}", f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
            clients = {
                "gateway": functools.partial(_openai_client_for, url, model, tokens),
                "triton_http": lambda w: lambda: TritonHttpStream(http_url, TRITON_MODEL, tokens, w),
                "triton_grpc": lambda w: lambda: TritonGrpcStream(grpc_url, TRITON_MODEL, tokens, w),
            }
            log_path = logs / f"stack-{engine}.log"
            try:
                proc = running.enter_context(stack_door(port, http, grpc, metrics, env, log_path))
                servers += [Timed(f"{door}/{engine}", clients[door], proc, log_path) for door in stack]
            except (RuntimeError, TimeoutError) as exc:
                _failed(failures, f"{'/'.join(stack)}/{engine}", exc)
        _time_servers(figures, plan, servers, failures)
    return figures


def _openai_client_for(url: str, model: str, tokens: int, workload: Workload) -> Callable[[], object]:
    return lambda: OpenAIStream(url, model, tokens, workload)


def _failed(failures: list[str], target: str, exc: BaseException) -> None:
    log.error("%s failed: %s", target, exc)
    failures.append(f"{target}: {exc}")


def run_vllm_serve(plan: Plan, folder: Path, model: str, dtype: str, logs: Path, failures: list[str]) -> Figures:
    figures: Figures = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = logs / "vllm_serve.log"
    with vllm_serve(folder, model, port, eager=True, log_path=log_path, dtype=dtype) as proc:
        client_for = functools.partial(_openai_client_for, url, model, plan.tokens)
        _time_servers(figures, plan, [Timed("vllm_serve", client_for, proc, log_path)], failures)
    return figures


def run_llama_server(plan: Plan, binary: Path, gguf: Path, logs: Path) -> Figures:
    """llama-server restarted per level: its parallel slots (-np) equal the concurrency, as the issue asks."""
    from bench.peers.llama_server import llama_server

    figures: Figures = {}
    for workload in plan.workloads:
        numbers = itertools.count()
        rows: list[dict] = []
        for c in plan.levels:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log.info("llama_server -np %d, workload %s", c, workload.name)
            server: AbstractContextManager = llama_server(
                binary, gguf, port, usable_cores(), c, LLAMA_CTX_PER_SLOT * c, logs / f"llama_server-{c}.log"
            )
            with server as proc:
                client = functools.partial(OpenAIStream, url, "llama-server", plan.tokens, workload)
                rows += asyncio.run(sweep(client, plan, [c], numbers))
                _check_alive(proc, f"llama_server -np {c}", logs / f"llama_server-{c}.log")
        _record(figures, workload, "llama_server", rows)
    return figures


def merge(into: Figures, more: Figures) -> Figures:
    for workload, targets in more.items():
        into.setdefault(workload, {}).update(targets)
    return into
