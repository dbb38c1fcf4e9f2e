#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer (the load generator genai-perf drives) into VENV/bin, offline from PyPI and Debian:
#   - the binary: tritonclient 2.41.0's wheel still carries it (later tritonclient wheels do not, and PyPI's
#     `perf-analyzer` package is an empty placeholder);
#   - its libraries: libb64 (Debian libb64-0d) and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12; it loads without
#     a GPU, perf_analyzer only calls CUDA for CUDA shared memory, which we never ask for).
# VENV/bin/perf_analyzer is a wrapper that points LD_LIBRARY_PATH at those libraries. Idempotent. Called by
# deploy/install-tools.sh. Usage: deploy/install-perf-analyzer.sh [VENV]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${1:-$ROOT/.venv}" && pwd)"
TRITONCLIENT_WHEEL=tritonclient==2.41.0
CUDART_WHEEL=nvidia-cuda-runtime-cu12==12.3.101
DEST="$VENV/lib/perf_analyzer-2.41.0"

if [[ -x "$VENV/bin/perf_analyzer" && -x "$DEST/perf_analyzer" ]]; then
    exit 0
fi
if ! ldconfig -p | grep -q 'libb64.so.0d'; then
    SUDO=()
    [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends libb64-0d >/dev/null
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
    -d "$tmp" "$TRITONCLIENT_WHEEL" "$CUDART_WHEEL"
mkdir -p "$DEST/lib"
"$VENV/bin/python" - "$tmp" "$DEST" <<'PY'
import pathlib, sys, zipfile

tmp, dest = map(pathlib.Path, sys.argv[1:])
for wheel in tmp.glob("*.whl"):
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith("/bin/perf_analyzer"):
                (dest / "perf_analyzer").write_bytes(zf.read(name))
            elif name.endswith("/libcudart.so.12"):
                (dest / "lib" / "libcudart.so.12").write_bytes(zf.read(name))
PY
chmod 755 "$DEST/perf_analyzer"
cat >"$VENV/bin/perf_analyzer" <<WRAP
#!/usr/bin/env bash
LD_LIBRARY_PATH="$DEST/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$DEST/perf_analyzer" "\$@"
WRAP
chmod 755 "$VENV/bin/perf_analyzer"
"$VENV/bin/perf_analyzer" --version >/dev/null 2>&1 || "$VENV/bin/perf_analyzer" 2>&1 | grep -q "perf_analyzer" \
    || { echo "install-perf-analyzer: $VENV/bin/perf_analyzer does not run" >&2; exit 1; }
echo "install-perf-analyzer: $VENV/bin/perf_analyzer ($TRITONCLIENT_WHEEL)"
