"""The affinity benchmark's pure parts: the workload, the routing policies, the arithmetic and the report."""

from __future__ import annotations

from collections import Counter

import psutil
import pytest

from bench.affinity import (
    POLICIES,
    RunResult,
    Turn,
    combine,
    conversations,
    hit_rate,
    paired_ratios,
    report,
    run_order,
    summarize,
    tree_cpu_seconds,
)


def test_conversations_are_distinct_within_and_across_runs() -> None:
    convs = conversations(20, 5)
    assert len(convs) == 20 and all(len(c) == 5 for c in convs)
    assert len({c[0] for c in convs}) == 20  # every conversation opens differently: its own routing key
    assert not {c[0] for c in convs} & {c[0] for c in conversations(20, 5, run=1)}  # a run finds no earlier one
    assert conversations(20, 5) == convs  # deterministic
    with pytest.raises(ValueError):
        conversations(0, 5)


def test_runs_alternate_the_policies() -> None:
    assert run_order(3) == ["affinity", "round_robin", "round_robin", "affinity", "affinity", "round_robin"]
    assert Counter(run_order(2)) == Counter(dict.fromkeys(POLICIES, 2))


def test_hit_rate_and_summaries() -> None:
    assert hit_rate(0, 0) == 0.0 and hit_rate(48, 64) == 0.75
    for cached, prompt in ((65, 64), (-1, 10), (1, -1)):
        with pytest.raises(ValueError):
            hit_rate(cached, prompt)
    turns = [Turn(100, ttft, ttft + 0.2) for ttft in [0.1, 0.3, 0.2, 0.4]]
    run = summarize("affinity", turns, errors=1, cached_tokens=300, total_s=2.345, per_server=[2, 2])
    assert (run.requests, run.errors, run.prompt_tokens, run.cached_tokens) == (4, 1, 400, 300)
    assert run.hit_rate == 0.75 and run.ttft_p50_ms == 250.0 and run.ttft_p95_ms == 400.0 and run.total_s == 2.35
    assert run.per_server == {"server0": 2, "server1": 2}
    run.server_cpu_s = 1.0
    other = RunResult("affinity", 4, 0, 600, 100, 1 / 6, 150.0, 300.0, 3.0, server_cpu_s=3.0)
    rr = RunResult("round_robin", 4, 0, 400, 100, 0.25, 500.0, 900.0, 4.0, server_cpu_s=2.0)
    summary = combine([run, other, rr])
    assert summary["affinity"]["hit_rate"] == 0.4  # token-weighted over runs: 400 of 1000, not the mean of rates
    assert summary["affinity"]["runs"] == 2 and summary["affinity"]["ttft_p50_ms"] == 200.0
    assert summary["round_robin"]["total_s"] == 4.0
    # pairs: (run, rr) and (other, -) -> one pair; the lone run at the end is left out
    assert paired_ratios([run, rr, other]) == {"pairs": 1, "ttft_p50": 0.5, "total_time": 0.588, "server_cpu": 0.5}
    assert paired_ratios([run, other]) == {}


def test_report_names_both_policies_and_their_ratio() -> None:
    meta = {"conversations": 20, "turns": 5, "tokens": 16, "concurrency": 4, "cpus": 2, "load_before": "1.00"}
    meta["load_after"] = "2.00"
    runs = [
        RunResult("affinity", 100, 0, 1000, 700, 0.7, 500.0, 900.0, 60.0, server_cpu_s=40.0),
        RunResult("round_robin", 100, 0, 1000, 500, 0.5, 1000.0, 2000.0, 90.0, server_cpu_s=50.0),
    ]
    text = report(meta, runs)
    assert "| affinity | 1 | 100 | 0 | 70.0 % | 500.0 | 60.0 | 40.0 |" in text
    assert "| round_robin | 1 | 100 | 0 | 50.0 % | 1000.0 | 90.0 | 50.0 |" in text
    assert "median over 1 back-to-back pair(s) of runs: TTFT p50 x0.50, total time x0.67, server CPU x0.80" in text
    assert "load average 1.00 before / 2.00 after" in text


def test_tree_cpu_seconds_counts_a_busy_child() -> None:
    import os
    import subprocess
    import sys
    import time

    # the spinning process is a grandchild in a session of its own, as Triton's stubs are
    spin = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'while True: pass'], start_new_session=True)"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        started = time.monotonic()
        while (used := tree_cpu_seconds([busy.pid])) < 0.3:  # it spins: its CPU time grows, however loaded we are
            assert time.monotonic() - started < 60, "no CPU time counted for a spinning process"
            time.sleep(0.1)
        assert used <= (time.monotonic() - started) + 0.5  # one thread: no more than the wall time it has had
        assert tree_cpu_seconds([os.getpid() + 10_000_000]) == 0.0  # no such process
    finally:
        for proc in [*psutil.Process(busy.pid).children(recursive=True), psutil.Process(busy.pid)]:
            proc.kill()
        busy.wait()
