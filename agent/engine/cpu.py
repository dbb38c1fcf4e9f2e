"""CPU facts: the cores the engines size their thread pools by, and the instruction sets `auto` chooses an engine by.

The engines' speed on CPU depends on the instruction sets more than on anything else (docs/engines.md): vLLM's CPU
kernels run bf16 natively only with AVX-512 BF16 or AMX, and fall back to a slow emulation on AVX2-only CPUs (AMD
Zen 3), while ONNX Runtime's MLAS kernels have fast AVX2 and AVX-512 paths for fp32, int8 and int4 alike.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")

# The flags that matter to the engines, as Linux spells them in /proc/cpuinfo.
_KNOWN = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def usable_cores() -> int:
    """Cores this process may run on (respects taskset / cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuFeatures:
    """The x86 instruction sets of this CPU that decide which engine is fastest (`flags` as in /proc/cpuinfo)."""

    flags: frozenset[str] = frozenset()
    model: str = ""

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        """AVX-512 Foundation: ONNX Runtime's MLAS and vLLM's `_C_AVX512` kernels run on it."""
        return "avx512f" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX-512 BF16 or AMX): without it vLLM's bf16 kernels are emulated, slowly."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def vnni(self) -> bool:
        """int8 dot products in hardware (AVX-512 VNNI or AVX-VNNI): ONNX Runtime's int8/int4 kernels use them."""
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def amx(self) -> bool:
        return bool({"amx_bf16", "amx_int8"} & self.flags)

    @property
    def kind(self) -> str:
        """One word for logs and docs: amx, avx512-bf16, avx512, avx2, or older (flags unknown or pre-AVX2)."""
        if self.amx:
            return "amx"
        if self.avx512 and self.native_bf16:
            return "avx512-bf16"
        if self.avx512:
            return "avx512"
        return "avx2" if self.avx2 else "older"

    def describe(self) -> str:
        """`kind (flag, flag, ...)` with the flags that matter, for the start-up log."""
        shown = [f for f in _KNOWN if f in self.flags]
        return f"{self.kind} ({', '.join(shown) or 'none of ' + ', '.join(_KNOWN[:4])})"


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The first processor's `flags` and `model name` from the text of /proc/cpuinfo (empty on other layouts)."""
    flags: frozenset[str] | None = None
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "flags" and flags is None:
            flags = frozenset(value.split())
        elif key == "model name" and not model:
            model = value.strip()
        if flags is not None and model:
            break
    return CpuFeatures(flags=flags or frozenset(), model=model)


@lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's CPU features, read once (no flags where /proc/cpuinfo is unreadable, e.g. not Linux)."""
    try:
        features = parse_cpuinfo(CPUINFO.read_text())
    except OSError as exc:
        log.info("cannot read %s (%s): CPU features unknown", CPUINFO, exc)
        return CpuFeatures()
    return features
