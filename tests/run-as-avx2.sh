#!/usr/bin/env bash
# The suites whose results depend on the CPU's instruction sets, on an emulated AVX2-only x86-64 CPU, from any
# machine (`make test-avx2`). ONNX Runtime's MLAS, oneDNN and PyTorch pick their kernels from CPUID when the process
# starts; under qemu-user's `-cpu max` (QEMU 7.2's TCG: AVX2 + FMA, no AVX-512, no VNNI, no AMX) they take the
# paths an AMD Zen 3 or an Intel Haswell-Skylake client takes, while the same wheels on an AVX-512 host take others.
# So an AVX-512 developer machine can check what `make test` asserts about batch invariance per precision
# (docs/onnx.md) before an AVX2 machine does. Emulation is ~30x slower: only these suites, never timed, never in CI.
#
# Caveats: /proc/cpuinfo is the host's under qemu-user, so `auto`'s choice (agent.engine.cpu) is not exercised here
# (tests/engine/test_cpu.py covers it per CPU kind from flags); child processes (servers) run natively.
set -euo pipefail
PY=${PY:-.venv/bin/python}
command -v qemu-x86_64 >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-user; }
emulate=(qemu-x86_64 -cpu "${AVX2_QEMU_CPU:-max}")

# The guard: a run that silently took the AVX-512 kernels would prove nothing.
"${emulate[@]}" "$PY" -c '
import torch
capability = torch.backends.cpu.get_cpu_capability()
assert capability == "AVX2", f"the emulated CPU offers {capability}, not AVX2 only"
print("emulated CPU: torch kernels", capability)'

# The ONNX engine's own suites and its runs of the engine and structured-output contracts (a -k in the arguments
# replaces `-k onnx`: pytest keeps the last).
"${emulate[@]}" "$PY" -m pytest -p no:cacheprovider -o timeout=3600 -rs -k onnx \
    tests/engine/onnx tests/engine/test_contract.py tests/engine/test_structured_contract.py "$@"
