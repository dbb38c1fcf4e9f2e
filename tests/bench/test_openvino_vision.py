"""bench.openvino_vision without servers: the image workload, the ratios, the issue's targets and the report."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from bench.openvino_vision import check_targets, image_workload, markdown, ratios


def _level(n: int, tok_s: float, ttft: float) -> dict:
    return {"concurrency": n, "tok_per_s": tok_s, "req_per_s": 0.1, "ttft_p50_ms": ttft, "itl_p50_ms": 9.0,
            "e2e_p50_s": 1.0, "errors": 0, "rounds": 1}  # fmt: skip


PART = {
    "workload": "one 448x448 image + a question",
    "targets": {
        "fastapi/openvino_int8": {"env": {}, "levels": [_level(1, 6.0, 1000.0), _level(8, 20.0, 3000.0)]},
        "fastapi/transformers": {"env": {}, "levels": [_level(1, 1.5, 2500.0), _level(8, 5.0, 9000.0)]},
    },
}


def test_image_requests_are_distinct_pngs_of_the_asked_side() -> None:
    workload = image_workload(64)
    first, second = workload.messages(0), workload.messages(1)
    text, image = first[0]["content"]
    assert text["type"] == "text" and image["type"] == "image_url"  # the distinct text comes first
    png = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert first != second and not workload.prefix_reuse


def test_ratios_and_targets() -> None:
    got = ratios(PART, "fastapi/openvino_int8", "fastapi/transformers")
    assert got == [{"concurrency": 1, "tok_per_s": 4.0, "ttft_p50_ms": 0.4}, {"concurrency": 8, "tok_per_s": 4.0,
                   "ttft_p50_ms": 0.33}]  # fmt: skip
    met = {(t["figure"], t["concurrency"]): t["met"] for t in check_targets(got)}
    assert met == {("tok_per_s", 1): True, ("tok_per_s", 8): False, ("ttft_p50_ms", 1): True}  # 4x < 5x at 8


def test_a_missing_level_does_not_meet_its_target() -> None:
    assert not any(t["met"] for t in check_targets([]))


def test_markdown_names_the_load_and_every_target() -> None:
    part = {**PART, "ratios": ratios(PART, "fastapi/openvino_int8", "fastapi/transformers")}
    result = {
        "date": "2026-12-07",
        "args": {"tokens": 32, "rounds": 1},
        "machine": {"cpu": "x", "cores": 2, "load_before": [9.0, 9.0, 9.0], "load_after": [10.0, 10.0, 10.0]},
        "parts": {"images": part},
        "targets": check_targets(part["ratios"]),
    }
    text = markdown(result)
    assert "load average before the run [9.0, 9.0, 9.0]" in text
    assert "| fastapi/transformers | 8 | 5.00 |" in text and "| tok_per_s | 8 | >= 5.0 | 4.0 | no |" in text
    part["targets"]["fastapi/transformers"]["levels"][1]["ttft_p50_ms"] = None  # images: TTFT only at 1
    assert "| fastapi/transformers | 8 | 5.00 | 0.100 | — |" in markdown(result)


def test_make_bench_runs_it() -> None:
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    bench = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "-m bench.openvino_vision" in bench
