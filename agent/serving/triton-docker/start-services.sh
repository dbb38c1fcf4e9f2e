#!/usr/bin/env bash
# Start newbie-app: Triton (model) + FastAPI (gateway), with Docker when a daemon answers, else locally.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./triton-docker/start-services.sh [--docker | --local] [--no-build] [--dry-run] [-- ARGS...]

Starts Triton (the model: :8001 HTTP, :8002 gRPC, :8003 metrics) and FastAPI in gateway mode (:8000).

  With Docker (a daemon answers `docker info`):
      docker compose build && docker compose up -d   (or docker-compose), then waits until
      http://localhost:8000/health and http://localhost:8001/v2/health/ready answer; nginx (:8080),
      Prometheus (:9090) and Grafana (:3000) start too. Stop with `docker compose down`.
  Without Docker (no daemon, or --local):
      .venv/bin/python -m agent.cli up ARGS...   (`make run` first if .venv is missing)
      starts Triton and FastAPI on this machine in the foreground; Ctrl-C stops both.

Options:
  --docker     require Docker (fail if no daemon answers)
  --local      run locally even if Docker is available
  --no-build   Docker: skip `build` (use existing images)
  --dry-run    print what would run, run nothing
  -h, --help   this help

Environment: every variable of docker-compose.yml / agent/config.py (MODEL_PATH, QUANTIZATION_TYPE, ...);
WAIT_TIMEOUT (seconds to wait for health with Docker, default 900).
USAGE
}

# The repository root, also when called through the root symlink triton-docker -> agent/serving/triton-docker.
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../../.." && pwd)"
MODE=auto BUILD=1 DRY_RUN=0
EXTRA=()
while (($#)); do
    case "$1" in
        --docker) MODE=docker ;;
        --local) MODE=local ;;
        --no-build) BUILD=0 ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "start-services: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

run() {
    echo "+ $*"
    ((DRY_RUN)) || "$@"
}

docker_daemon_answers() {
    command -v docker >/dev/null 2>&1 && timeout 15 docker info >/dev/null 2>&1
}

compose_cmd() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif command -v docker-compose >/dev/null 2>&1; then
        echo "docker-compose"
    fi
}

http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 5 "$1" 2>/dev/null
    else
        python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1" 2>/dev/null
    fi
}

wait_healthy() {
    local url deadline=$((SECONDS + ${WAIT_TIMEOUT:-900}))
    for url in http://localhost:8001/v2/health/ready http://localhost:8000/health; do
        echo "waiting for $url (model loading can take minutes; logs: docker compose logs -f triton-server)"
        until http_ok "$url"; do
            if ((SECONDS > deadline)); then
                echo "start-services: $url not ready after ${WAIT_TIMEOUT:-900}s" >&2
                return 1
            fi
            sleep 5
        done
    done
}

start_docker() {
    local compose
    compose="$(compose_cmd)"
    if [[ -z $compose ]]; then
        echo "start-services: Docker answers but neither 'docker compose' nor 'docker-compose' is installed" >&2
        exit 1
    fi
    read -r -a compose <<<"$compose"
    compose+=(-f "$ROOT/docker-compose.yml")
    echo "start-services: Docker daemon found: starting the compose stack"
    ((BUILD)) && run "${compose[@]}" build
    run "${compose[@]}" up -d
    ((DRY_RUN)) && return 0
    wait_healthy
    cat <<'URLS'
ready:
  FastAPI     http://localhost:8000 (web UI), /docs, /health
  Triton      http://localhost:8001/v2/health/ready (HTTP), localhost:8002 (gRPC), http://localhost:8003/metrics
  nginx       http://localhost:8080 (one entry point: / -> FastAPI, /v2/ -> Triton)
  Prometheus  http://localhost:9090      Grafana  http://localhost:3000
URLS
}

start_local() {
    echo "start-services: no Docker daemon (or --local): starting Triton + FastAPI (gateway) on this machine"
    cd "$ROOT"
    if [[ -x .venv/bin/python ]]; then
        run exec .venv/bin/python -m agent.cli up "${EXTRA[@]}"
    else
        run exec make run
    fi
}

case "$MODE" in
    docker)
        docker_daemon_answers || { echo "start-services: --docker given but no Docker daemon answers" >&2; exit 1; }
        start_docker
        ;;
    local) start_local ;;
    auto) if docker_daemon_answers; then start_docker; else start_local; fi ;;
esac
