"""CPU facts the engines size their thread pools by."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (respects taskset / cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
