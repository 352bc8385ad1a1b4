# Two commands on a fresh machine:  make demo   (quickstart on the embedded digits)
#                                   make test   (the whole test suite; .ci/run calls it)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nt-dist-installed

.PHONY: setup demo test test-fast ui bench lint docs clean

setup: $(STAMP)

# torch/torchvision: the pair served from local files on our machines (pip is capped there;
# a newer torch would download several GB). setup.cfg states lower bounds only, which this pair
# satisfies, so the `pip install -e` below keeps it. DeepSpeed is installed without building its ops
# (they JIT-compile on first use). ffcv builds against OpenCV and libturbojpeg: installed here
# when we are root; otherwise the loader falls back to torchvision and we say what to install.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing ffcv's system packages (pkg-config, OpenCV, libturbojpeg)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      pkg-config libopencv-dev libturbojpeg0-dev >/dev/null) || echo "warning: apt-get failed"; \
	  else \
	    echo "note: ffcv needs: sudo apt-get install pkg-config libopencv-dev libturbojpeg0-dev"; \
	  fi; \
	fi
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[deepspeed,test,docs]'
	@if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  $(BIN)/pip install -q -e '.[ffcv]' || echo "warning: ffcv did not build; the torchvision loader will be used"; \
	fi
	@touch $@

demo: setup
	$(BIN)/nt-dist quickstart --out runs/quickstart

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

ui: setup
	$(BIN)/nt-dist ui --port 5000

bench: setup
	$(BIN)/python benchmarks/train_throughput.py --quick
	$(BIN)/python benchmarks/loader_throughput.py --quick

lint: setup
	$(BIN)/ruff check nt_dist tests benchmarks

# the documentation site (mkdocs.yml, docs/) on http://127.0.0.1:8000, rebuilt on every edit
docs: setup
	$(BIN)/mkdocs serve

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
