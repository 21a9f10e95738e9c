# Two commands on a fresh machine: `make setup`, then `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# mlx[cpu] on Linux bundles a reference BLAS ~50x slower than OpenBLAS; preload Debian's when present.
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libblas.so.3
PRELOAD  := $(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS),)

.PHONY: setup openblas test test-all lint fmt bench

setup: openblas
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@$(BIN)/mlxtune --version

# Debian/Ubuntu only, and only with root or passwordless sudo; elsewhere a no-op.
openblas:
	@if [ "$$(uname)" = Linux ] && command -v apt-get >/dev/null && [ ! -e "$(OPENBLAS)" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "note: no root: skipping libopenblas0-pthread (MLX on CPU will be ~50x slower)"; exit 0; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	fi

test:
	$(PRELOAD) $(BIN)/python -m pytest

test-all:
	$(PRELOAD) $(BIN)/python -m pytest -m ""

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench:
	$(PRELOAD) $(BIN)/python benchmarks/bench_blas.py
