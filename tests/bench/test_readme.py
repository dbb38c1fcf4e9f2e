"""README's performance tables are generated from a result JSON, between markers, and nothing else is touched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import readme, report
from tests.bench.test_report import _result

README = f"# App\n\nintro\n\n## Performance\n\nhand-written\n\n{readme.BEGIN}\nold figures\n{readme.END}\n\n## Next\n"


def test_rewrite_replaces_only_the_marked_section() -> None:
    out = readme.rewrite(README, "new figures")
    assert "old figures" not in out and f"{readme.BEGIN}\nnew figures\n{readme.END}" in out
    assert out.startswith("# App\n\nintro\n\n## Performance\n\nhand-written\n") and out.endswith("\n\n## Next\n")
    assert readme.rewrite(out, "new figures") == out  # idempotent


@pytest.mark.parametrize("text", ["no markers", f"{readme.END}\n{readme.BEGIN}", f"{readme.BEGIN}{readme.BEGIN}"])
def test_rewrite_refuses_a_readme_without_one_marker_pair(text: str) -> None:
    with pytest.raises(ValueError, match="needs exactly one"):
        readme.rewrite(text, "x")


def test_section_carries_the_runs_figures() -> None:
    result = _result()
    text = readme.section(result, "bench/results/stamp.md")
    assert "[bench/results/stamp.md](bench/results/stamp.md)" in text and "bench/results/stamp.png" in text
    assert "**1.80x** at 1 and **1.90x** at 32" in text  # shipped / llama-server, from the JSON
    assert "10 %" in text  # the gateway's end-to-end overhead at 1
    for line in report.summary_table(result["targets"]["random"], result["floor_fraction"], 32):
        assert line in text


def test_main_rewrites_the_readme_from_the_newest_result(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "old.json").write_text(json.dumps({"targets": {}}))  # the previous layout: skipped
    (results / "run.json").write_text(json.dumps(_result()))
    partial = _result()
    partial["targets"] = {"random": {"fastapi/onnx_fp32": partial["targets"]["random"]["fastapi/onnx_int4"]}}
    (results / "partial.json").write_text(json.dumps(partial))  # newer, but `make run`'s target is not in it
    later = (results / "run.json").stat().st_mtime + 60
    os.utime(results / "partial.json", (later, later))
    target = tmp_path / "README.md"
    target.write_text(README)
    assert readme.newest_result(results) == results / "run.json"
    readme.main([str(results / "run.json"), "--readme", str(target)])
    text = target.read_text()
    assert "old figures" not in text and "(results/run.md)" in text and "hand-written" in text


def test_main_adds_the_newest_side_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "run.json").write_text(json.dumps(_result()))
    (results / "2026-01-01-affinity.md").write_text("# Affinity, old\n\n| policy | hit |\n| rr | 0.1 |\n")
    (results / "2026-02-01-affinity.md").write_text("# Affinity vs round robin\n\n| policy | hit |\n| rr | 0.2 |\n")
    target = tmp_path / "README.md"
    target.write_text(README)
    readme.main([str(results / "run.json"), "--readme", str(target)])
    text = target.read_text()
    assert "**Affinity vs round robin** ([results/2026-02-01-affinity.md](results/2026-02-01-affinity.md))" in text
    assert "| rr | 0.2 |" in text and "Affinity, old" not in text


def test_the_projects_readme_has_the_markers() -> None:
    text = readme.README.read_text()
    assert text.count(readme.BEGIN) == 1 and text.count(readme.END) == 1
