#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer (the load generator genai-perf drives) into VENV/bin, offline from PyPI and Debian:
#   - the binary: tritonclient's manylinux1 wheels carry it up to 2.60 (later ones do not, and PyPI's `perf-analyzer`
#     package is an empty placeholder). 2.51.0 is the newest whose binary runs on glibc 2.36 (Debian 12; 2.52+ want
#     glibc 2.38), and its profile export has the request inputs / response outputs genai-perf 0.0.8 reads (2.41's
#     has not; deploy/install-genai-perf.sh);
#   - its libraries: libb64 (Debian libb64-0d) and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12; it loads without
#     a GPU, perf_analyzer only calls CUDA for CUDA shared memory, which we never ask for).
# VENV/bin/perf_analyzer is a wrapper that points LD_LIBRARY_PATH at those libraries. Idempotent. Called by
# deploy/install-tools.sh. Usage: deploy/install-perf-analyzer.sh [VENV]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${1:-$ROOT/.venv}" && pwd)"
PA_VERSION=2.51.0
TRITONCLIENT_WHEEL="tritonclient==$PA_VERSION"
CUDART_WHEEL=nvidia-cuda-runtime-cu12==12.3.101
DEST="$VENV/lib/perf_analyzer-$PA_VERSION"

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
rm -rf "$VENV"/lib/perf_analyzer-*  # an older install's binary and libraries
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
"$VENV/bin/perf_analyzer" --version 2>&1 | grep -q "Perf Analyzer Version $PA_VERSION" \
    || { echo "install-perf-analyzer: $VENV/bin/perf_analyzer does not run" >&2; exit 1; }
echo "install-perf-analyzer: $VENV/bin/perf_analyzer ($TRITONCLIENT_WHEEL)"
