#!/usr/bin/env bash
# CI check of the model zoo: build recipes/zoo-demo.yaml (smollm2-135m x rtn, gptq, awq, nf4, int8) into a
# temporary folder, verify every hash, then build again: the second build must rebuild nothing.
# Exit non-zero on a build error, a failed gate, a hash mismatch, or a second build that rebuilt anything.
#   ZOO_OUT=dir   keep the zoo in `dir` instead of a temporary folder (its index.md is the README's table)
#   QUANTKIT=cmd  the quantkit command (default .venv/bin/quantkit)
set -euo pipefail
cd "$(dirname "$0")/.."
QUANTKIT=${QUANTKIT:-.venv/bin/quantkit}
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/quantkit-ci-zoo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
OUT=${ZOO_OUT:-$WORK/zoo}

t0=$(date +%s)
$QUANTKIT zoo build recipes/zoo-demo.yaml --out "$OUT" --device cpu --json "$WORK/first.json"
t1=$(date +%s)
$QUANTKIT zoo verify "$OUT"
t2=$(date +%s)
$QUANTKIT zoo build recipes/zoo-demo.yaml --out "$OUT" --device cpu --json "$WORK/second.json"
t3=$(date +%s)
$PYTHON - "$WORK/second.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
if report["built"]:
    sys.exit(f"ci-zoo: the second build rebuilt {', '.join(report['built'])}; it must rebuild nothing")
print(f"ci-zoo: second build rebuilt nothing ({len(report['up_to_date'])} entries up to date)")
PY
$QUANTKIT zoo publish "$OUT" --repo-prefix quantkit-ci/ --dry-run
echo "ci-zoo: first build $((t1 - t0)) s, verify $((t2 - t1)) s, no-op build $((t3 - t2)) s"
