"""`make bench`'s OpenVINO step: the OpenVINO engine against the other CPU engines, through the FastAPI door.

Every target is a `dsa-agent serve` subprocess (bench.targets.fastapi_door) timed from this process over OpenAI's
streaming `/v1/chat/completions` (bench.load.OpenAIStream): the door, HTTP, SSE and JSON are in the figures. The two
servers of a comparison are up at once and measured in turn, level by level and round by round (interleaved), so
both see the same machine load. Every request streams exactly `--tokens` tokens (greedy, `ignore_eos`) and has its
own text (and image), so no prefix cache meets a prompt twice. Images: TTFT at 1 is the time of a 1-token request
(see UsageStream).

- **images** (issue 17's targets): a Qwen3-VL whose vision tower has Qwen3-VL-2B-Instruct's dimensions
  (agent.devtools.qwen3vl_shape, random weights, 2 decoder layers), one `--side`x`--side` image + a question per
  request, `IMAGE_MAX_PIXELS=side^2`. OpenVINO (int8 weights, `DTYPE=float32`) against transformers (fp32). Targets:
  OpenVINO tok/s >= 3x transformers' at 1 concurrent and >= 5x at 8, TTFT p50 at 1 <= 1/2 of transformers'.
- **text**: the embedded SmolLM2-135M, OpenVINO int4 (groups of 32) against ONNX Runtime GenAI int4, random
  prompts of ~`--prompt-tokens` tokens (bench.workloads.random_workload).

Writes bench/results/<date>-openvino-vision.{json,md}. Usage: `python -m bench.openvino_vision [--levels 1 8]
[--tokens 32] [--rounds 1] [--parts images text]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import io
import itertools
import json
import logging
import os
import platform
import statistics
from pathlib import Path

import httpx

from bench.load import OpenAIStream, RequestSample, StreamTimer, run_level
from bench.targets import fastapi_door, free_port
from bench.workloads import Workload, random_workload

log = logging.getLogger("bench.openvino")
RESULTS = Path(__file__).parent / "results"
# (figure, target ratio, how OpenVINO must compare): the image targets.
IMAGE_TARGETS = [("tok_per_s", 1, 3.0, ">="), ("tok_per_s", 8, 5.0, ">="), ("ttft_p50_ms", 1, 0.5, "<=")]
SHOWN = ("tok_per_s", "req_per_s", "ttft_p50_ms", "itl_p50_ms", "e2e_p50_s", "errors")


def image_workload(side: int) -> Workload:
    """Request i: its own question first (distinct prompts from the first token), then its own image."""
    from PIL import Image

    def messages(i: int) -> list[dict]:
        image = Image.new("RGB", (side, side), ((37 * i) % 256, (91 * i) % 256, 160))
        image.paste(((53 * i) % 256, 30, 200), (side // 4, side // 4, side // 2, 3 * side // 4))  # a "diagram"
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content = [
            {"type": "text", "text": f"Screenshot {i}: what does it show?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]
        return [{"role": "user", "content": content}]

    return Workload("images", f"one {side}x{side} image + a question", messages, prefix_reuse=False)


class UsageStream(OpenAIStream):
    """OpenAIStream for the random-weight vision model, counting tokens from the final `usage`: its tokenizer has
    508 entries for a 151936-row LM head, so nearly every generated id decodes to no text and the stream carries
    almost no content events to time. A request's TTFT is therefore measured as the end-to-end time of a
    `max_tokens=1` request (`first_token`); tok/s, req/s and e2e come from the `--tokens` requests."""

    def __init__(self, *args, first_token: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.first_token = first_token

    async def __call__(self, i: int) -> RequestSample:
        body = {
            "model": self.model,
            "messages": self.workload.messages(i),
            "max_tokens": 1 if self.first_token else self.tokens,
            "temperature": 0.0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        timer = StreamTimer()
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data:") and line.strip() != "data: [DONE]":
                    usage = json.loads(line[5:]).get("usage")
                    timer.tokens = usage["completion_tokens"] if usage else timer.tokens
        if not timer.tokens:
            raise RuntimeError("no tokens generated")
        timer.token()  # the end of the stream: TTFT for a 1-token request (otherwise not reported)
        return timer.sample()


def text_workload(prompt_tokens: int) -> Workload:
    from transformers import AutoTokenizer

    from agent.config import load_settings
    from agent.engine.checkpoints import resolve_model

    folder = resolve_model(None, load_settings().model_cache_dir).folder
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return random_workload(prompt_tokens, 7, lambda text: len(tokenizer.encode(text, add_special_tokens=False)))


def comparison(part: str, args: argparse.Namespace) -> tuple[dict[str, dict[str, str]], Workload]:
    """The targets (name -> server environment) and workload of one part."""
    if part == "images":
        from agent.config import load_settings
        from agent.devtools.qwen3vl_shape import build_qwen3vl_shape

        folder = build_qwen3vl_shape(load_settings().model_cache_dir / "qwen3vl-2b-shape")
        from bench.suite import fastest_dtype

        common = {
            "MODEL_PATH": str(folder),
            "IMAGE_MAX_PIXELS": str(args.side * args.side),
            "MAX_BATCH_SIZE": str(max(args.levels)),
        }
        # --compute fastest: each engine at its best on this CPU (bf16 only where native: OpenVINO's DTYPE=auto
        # decides that itself, transformers gets bench.suite's choice); float32: both in fp32.
        fast = args.compute == "fastest"
        ov, pt = ("auto", fastest_dtype()) if fast else ("float32", "float32")
        targets = {
            "fastapi/openvino_int8": {
                **common,
                "LOADING_STRATEGY": "openvino",
                "QUANTIZATION_TYPE": "int8",
                "DTYPE": ov,
            },
            "fastapi/transformers": {
                **common,
                "LOADING_STRATEGY": "transformers",
                "QUANTIZATION_TYPE": "none",
                "DTYPE": pt,
            },
        }
        return targets, image_workload(args.side)
    targets = {
        "fastapi/openvino_int4": {"LOADING_STRATEGY": "openvino", "QUANTIZATION_TYPE": "int4"},
        "fastapi/onnx_int4": {"LOADING_STRATEGY": "onnx", "QUANTIZATION_TYPE": "int4"},
    }
    return targets, text_workload(args.prompt_tokens)


async def _model_name(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return (await client.get("/v1/models")).json()["data"][0]["id"]


async def measure(urls: dict[str, str], workload: Workload, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Warm-up, then for each round and level every target in turn; medians over rounds per target and level."""
    numbers = itertools.count()
    images = workload.name == "images"
    clients, firsts = {}, {}
    for target, url in urls.items():
        model = await _model_name(url)
        if images:
            clients[target] = UsageStream(url, model, args.tokens, workload)
            firsts[target] = UsageStream(url, model, args.tokens, workload, first_token=True)
        else:
            clients[target] = OpenAIStream(url, model, args.tokens, workload)
        await clients[target](next(numbers))  # warm-up (compiles, first image), not counted
    runs: dict[str, dict[int, list[dict]]] = {t: {n: [] for n in args.levels} for t in urls}
    ttfts: dict[str, list[float]] = {t: [] for t in urls}
    try:
        for rnd in range(args.rounds):
            for n in args.levels:
                order = list(urls) if rnd % 2 == 0 else list(reversed(urls))  # neither always goes first
                for target in order:
                    row = await _level(clients[target], n, max(n, args.per_level), numbers)
                    runs[target][n].append(row)
                    log.info("%s at %d: %s", target, n, {k: row[k] for k in SHOWN})
                    if images and n == 1:  # TTFT at 1: max_tokens=1 requests, one at a time
                        first = await _level(firsts[target], 1, args.per_level, numbers)
                        ttfts[target].append(first["e2e_p50_s"] * 1000)
                        log.info("%s TTFT at 1: %.0f ms", target, ttfts[target][-1])
    finally:
        for client in [*clients.values(), *firsts.values()]:
            await client.close()
    out = {}
    for target, levels in runs.items():
        out[target] = []
        for n, rows in levels.items():
            row = {"concurrency": n, "rounds": len(rows), **{k: statistics.median(r[k] for r in rows) for k in SHOWN}}
            if images:  # TTFT from the 1-token requests at 1; ITL is not observable (see UsageStream)
                row["ttft_p50_ms"] = statistics.median(ttfts[target]) if n == 1 and ttfts[target] else None
                row["itl_p50_ms"] = None
            out[target].append(row)
    return out


async def _level(client, concurrency: int, requests: int, numbers: itertools.count) -> dict:
    base = next(numbers) * 1000  # request numbers never repeat across levels, rounds, targets
    return (await run_level(lambda i: client(base + i), concurrency, requests)).as_dict()


def run_part(part: str, args: argparse.Namespace, logs: Path) -> dict:
    targets, workload = comparison(part, args)
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for target, env in targets.items():  # one server at a time while loading (loads compete for the cores)
            port = free_port()
            log.info("starting %s", target)
            stack.enter_context(fastapi_door(port, env, logs / f"{part}-{target.replace('/', '-')}.log"))
            urls[target] = f"http://127.0.0.1:{port}"
        rows = asyncio.run(measure(urls, workload, args))
    shown = {t: {k: _portable(v) for k, v in e.items()} for t, e in targets.items()}
    return {"workload": workload.description, "targets": {t: {"env": shown[t], "levels": rows[t]} for t in targets}}


def _portable(value: str) -> str:
    """A setting as the result files show it: the model cache's path as MODEL_CACHE_DIR (no machine path)."""
    from agent.config import load_settings

    return value.replace(str(load_settings().model_cache_dir), "MODEL_CACHE_DIR")


def ratios(part: dict, ours: str, theirs: str) -> list[dict]:
    """OpenVINO's figure over the other's, per level (tok/s: higher is better; TTFT: lower)."""
    mine = {r["concurrency"]: r for r in part["targets"][ours]["levels"]}
    other = {r["concurrency"]: r for r in part["targets"][theirs]["levels"]}
    out = []
    for n in sorted(mine):
        row = {"concurrency": n}
        for key in ("tok_per_s", "ttft_p50_ms"):
            row[key] = round(mine[n][key] / other[n][key], 2) if mine[n][key] and other[n][key] else None
        out.append(row)
    return out


def check_targets(image_ratios: list[dict]) -> list[dict]:
    by_level = {r["concurrency"]: r for r in image_ratios}
    out = []
    for key, level, goal, sense in IMAGE_TARGETS:
        got = by_level.get(level, {}).get(key)
        met = got is not None and (got >= goal if sense == ">=" else got <= goal)
        out.append({"figure": key, "concurrency": level, "target": f"{sense} {goal}", "ratio": got, "met": met})
    return out


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def markdown(result: dict) -> str:
    lines = [
        f"# OpenVINO through the FastAPI door ({result['date']})",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} usable cores; load average before the run "
        f"{result['machine']['load_before']}, after {result['machine']['load_after']} (shared with other jobs: "
        "absolute figures are low; the ratios are taken within this run, targets interleaved).",
        f"Every request streams {result['args']['tokens']} tokens (greedy, ignore_eos); images: TTFT = a 1-token "
        "request at 1 (the random-weight model's tokens decode to almost no text), ITL not observable; "
        f"medians over {result['args']['rounds']} round(s).",
    ]
    for name, part in result["parts"].items():
        lines += ["", f"## {name}: {part['workload']}", ""]
        for target, data in part["targets"].items():
            env = {k: v for k, v in data["env"].items() if k in ("LOADING_STRATEGY", "QUANTIZATION_TYPE", "DTYPE")}
            lines.append(f"- {target}: " + ", ".join(f"{k}={v}" for k, v in env.items()))
        lines.append("")
        lines += ["| target | concurrency | tok/s | req/s | TTFT p50 ms | ITL p50 ms | e2e p50 s | errors |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---:|"]
        for target, data in part["targets"].items():
            for r in data["levels"]:
                lines.append(
                    f"| {target} | {r['concurrency']} | {r['tok_per_s']:.2f} | {r['req_per_s']:.3f} | "
                    f"{_ms(r['ttft_p50_ms'])} | {_ms(r['itl_p50_ms'])} | {r['e2e_p50_s']:.1f} | {r['errors']} |"
                )
        lines += ["", "| concurrency | OpenVINO / other: tok/s | TTFT |", "|---:|---:|---:|"]
        lines += [f"| {r['concurrency']} | {r['tok_per_s']} | {r['ttft_p50_ms']} |" for r in part["ratios"]]
    if "targets" in result:
        lines += ["", "## Image targets (issue 17)", "", "| figure | concurrency | target | ratio | met |"]
        lines += ["|---|---:|---|---:|---|"]
        lines += [
            f"| {t['figure']} | {t['concurrency']} | {t['target']} | {t['ratio']} | {'yes' if t['met'] else 'no'} |"
            for t in result["targets"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["images", "text"], choices=("images", "text"))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--side", type=int, default=448, help="image side in pixels (also IMAGE_MAX_PIXELS)")
    parser.add_argument("--compute", default="fastest", choices=("fastest", "float32"), help="images: precision")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="the text part's prompt length")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported")
    parser.add_argument("--per-level", type=int, default=2, help="requests at each level (at least the level)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="suffix for the result files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from agent.engine.cpu import cpu_features, usable_cores

    stamp = f"{dt.date.today().isoformat()}-openvino-vision" + (f"-{args.label}" if args.label else "")
    logs = args.out / f"{stamp}-logs"
    load_before = os.getloadavg()
    shown_args = {k: v for k, v in vars(args).items() if k != "out"}
    result: dict = {"date": dt.date.today().isoformat(), "args": shown_args}
    result["parts"] = {}
    pairs = {
        "images": ("fastapi/openvino_int8", "fastapi/transformers"),
        "text": ("fastapi/openvino_int4", "fastapi/onnx_int4"),
    }
    for part in args.parts:
        data = run_part(part, args, logs)
        data["ratios"] = ratios(data, *pairs[part])
        result["parts"][part] = data
    if "images" in result["parts"]:
        result["targets"] = check_targets(result["parts"]["images"]["ratios"])
    result["machine"] = {
        "cpu": cpu_features().model or platform.processor() or "cpu",
        "cores": usable_cores(),
        "load_before": [round(x, 1) for x in load_before],
        "load_after": [round(x, 1) for x in os.getloadavg()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / f"{stamp}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
