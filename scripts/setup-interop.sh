#!/usr/bin/env bash
# Builds .venv-interop: quantkit beside transformers + optimum + GPTQModel (CPU) + compressed-tensors, for tests/interop.
# GPTQModel is installed --no-deps (its requirements pin a newer torch); only what it needs to import is added.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${INTEROP_VENV:-.venv-interop}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt transformers==5.24.0 optimum==2.3.0
"${PIP[@]}" -c constraints.txt --no-deps gptqmodel==7.7.0
# light runtime deps that `import gptqmodel` needs (its full list pins torch>=2.14 and heavy extras)
"${PIP[@]}" -c constraints.txt device-smi logbar tokenicer pypcre defuser threadpoolctl dill pillow
# compressed-tensors: tests/interop/test_ct_interop.py loads quantkit's compressed-tensors checkpoints with it
# (never a quantkit dependency)
"${PIP[@]}" -c constraints.txt compressed-tensors==0.19.0
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" -c constraints.txt "transformers==5.24.0" "safetensors>=0.4" "accelerate>=1.0" "pydantic>=2.6" \
    "pyyaml>=6" "psutil>=5.9" "datasets>=3.0" "typer>=0.12" "rich>=13" "gguf>=0.10" "pytest>=8"
"$VENV/bin/python" -c "import gptqmodel, optimum, compressed_tensors, quantkit; print('interop venv ready: gptqmodel', gptqmodel.__version__, 'compressed-tensors', compressed_tensors.__version__)"
