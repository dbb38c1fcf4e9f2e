#!/usr/bin/env bash
# Install NVIDIA's genai-perf into a venv of its own (DEST), from PyPI only, with perf_analyzer beside it:
#   - genai-perf 0.0.8 and the set it was tested with (deploy/genai-perf-requirements.txt). 0.0.8 is the newest that
#     runs with a perf_analyzer this machine can run: 0.0.9+ pass `--warmup-request-count`, which perf_analyzer has
#     only from 2.52 on, and 2.52+ binaries need glibc 2.38 (Debian 12 has 2.36). 0.0.8 drives Triton over gRPC
#     (streaming); its HTTP mode speaks only OpenAI's routes (Triton's HTTP generate: docs/benchmarks.md);
#   - DEST/bin/perf_analyzer (2.51.0) by deploy/install-perf-analyzer.sh; genai-perf finds it on PATH.
# Idempotent. Called by deploy/install-tools.sh and the genai-perf test. Usage: deploy/install-genai-perf.sh [DEST]
# DEST defaults to $GENAI_PERF_VENV, else ~/.cache/newbie-app/tools/genai-perf-0.0.8. Python: $PYTHON or python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION=0.0.8
DEST="${1:-${GENAI_PERF_VENV:-$HOME/.cache/newbie-app/tools/genai-perf-$VERSION}}"
REQUIREMENTS="$ROOT/deploy/genai-perf-requirements.txt"

if ! "$DEST/bin/genai-perf" --version 2>/dev/null | grep -qx "genai-perf $VERSION"; then
    "${PYTHON:-python3}" -m venv --clear "$DEST"
    # numpy<2 comes from genai-perf itself; the file pins the rest to the tested set.
    "$DEST/bin/python" -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS"
fi
bash "$ROOT/deploy/install-perf-analyzer.sh" "$DEST" >/dev/null
"$DEST/bin/genai-perf" --version | grep -qx "genai-perf $VERSION" \
    || { echo "install-genai-perf: $DEST/bin/genai-perf does not run" >&2; exit 1; }
pa_version="$("$DEST/bin/perf_analyzer" --version 2>&1 | awk '{print $4}')"
echo "install-genai-perf: $DEST/bin/genai-perf ($VERSION, perf_analyzer $pa_version)"
