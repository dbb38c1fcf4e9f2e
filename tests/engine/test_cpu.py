"""CPU facts: the /proc/cpuinfo parser on real CPUs' texts, and what each CPU kind is taken to be."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.engine import cpu
from agent.engine.cpu import CpuFeatures, cpu_features, parse_cpuinfo

_COMMON = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx "
    "mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid pni pclmulqdq ssse3 "
    "fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy "
    "cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext fsgsbase bmi1 avx2 smep bmi2 erms invpcid rdseed adx "
    "smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves clzero xsaveerptr"
)


def _cpuinfo(model: str, flags: str, processors: int = 2) -> str:
    """A /proc/cpuinfo as Linux writes it: one block per logical processor."""
    block = (
        "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel name\t: {model}\nstepping\t: 1\n"
        "cpu MHz\t\t: 2445.406\ncache size\t: 512 KB\nfpu\t\t: yes\nflags\t\t: {flags}\n"
        "bugs\t\t: sysret_ss_attrs null_seg spectre_v1 spectre_v2\nbogomips\t: 4890.81\n"
        "address sizes\t: 48 bits physical, 48 bits virtual\npower management:\n\n"
    )
    return "".join(block.format(n=n, model=model, flags=flags) for n in range(processors))


# An AMD EPYC 7763 (Zen 3) cloud VM: AVX2 and FMA, no AVX-512, no native bf16.
ZEN3_TEXT = _cpuinfo("AMD EPYC 7763 64-Core Processor", _COMMON + " arat umip vaes vpclmulqdq rdpid fsrm")
# A Zen 4 EPYC (this project's build machine): AVX-512 with BF16 and VNNI.
ZEN4_TEXT = _cpuinfo(
    "AMD EPYC 9R14",
    _COMMON + " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi umip avx512_vbmi2 "
    "gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm",
)


def test_avx2_epyc_has_no_avx512_and_no_native_bf16() -> None:
    features = parse_cpuinfo(ZEN3_TEXT)
    assert features.model == "AMD EPYC 7763 64-Core Processor"
    assert features.avx2 and not features.avx512 and not features.native_bf16 and not features.vnni
    assert features.kind == "avx2"
    assert features.describe() == "avx2 (avx2, fma)"


def test_avx512_epyc_with_bf16_and_vnni() -> None:
    features = parse_cpuinfo(ZEN4_TEXT)
    assert features.model == "AMD EPYC 9R14"
    assert features.avx2 and features.avx512 and features.native_bf16 and features.vnni and not features.amx
    assert features.kind == "avx512-bf16"
    assert features.describe() == "avx512-bf16 (avx2, fma, avx512f, avx512bw, avx512_vnni, avx512_bf16)"


@pytest.mark.parametrize(
    ("flags", "kind", "native_bf16"),
    [
        ({"avx2", "avx512f", "avx512_vnni"}, "avx512", False),  # Skylake-SP / Cascade Lake: AVX-512 without BF16
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, "amx", True),  # Sapphire Rapids
        ({"avx2", "avx_vnni"}, "avx2", False),  # Alder Lake: VNNI on 256-bit vectors only
        ({"sse4_2", "avx"}, "older", False),
    ],
)
def test_kinds(flags: set[str], kind: str, native_bf16: bool) -> None:
    features = CpuFeatures(frozenset(flags))
    assert (features.kind, features.native_bf16) == (kind, native_bf16)


def test_text_without_flags_gives_an_unknown_cpu() -> None:
    # aarch64 writes "Features", not "flags"; an empty or unreadable file says nothing either.
    for text in ("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n", ""):
        features = parse_cpuinfo(text)
        assert features.flags == frozenset() and features.kind == "older" and not features.native_bf16


def test_cpu_features_reads_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "cpuinfo"
    fake.write_text(ZEN3_TEXT)
    monkeypatch.setattr(cpu, "CPUINFO", fake)
    cpu_features.cache_clear()
    try:
        assert cpu_features().kind == "avx2"
        fake.write_text(ZEN4_TEXT)
        assert cpu_features().kind == "avx2"  # cached: read once per process
        cpu_features.cache_clear()
        monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
        assert cpu_features() == CpuFeatures()
    finally:
        cpu_features.cache_clear()
