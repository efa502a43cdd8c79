#!/usr/bin/env bash
# One command that proves quantkit's CUDA paths on a GPU machine: quantize (RTN, GPTQ, AWQ) on cuda, eval --speed
# on cuda, every CUDA kernel against the reference module, one table in $OUT (or gpu-out/). See scripts/gpu_check.py.
#
#   bash scripts/gpu-check.sh                          # on a GPU machine (no network needed; carry gpu-wheels/)
#   bash scripts/gpu-check.sh --device cpu --dry-run   # the same steps on CPU with tiny models (CI)
#
# It installs quantkit from this tree into a venv that sees the interpreter's packages ($PYTHON, default python3:
# torch, transformers, ... stay the machine's own), with --no-deps, plus the wheels in gpu-wheels/
# (scripts/gpu-wheels.sh fetches them where a registry is reachable). Without CUDA and without --dry-run it
# prints one line and exits 0. Env: GPU_CHECK_VENV (default .venv-gpucheck), GPU_CHECK_WORK, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-.venv-gpucheck}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1  # nothing is fetched; no bars

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  exec "$PY" scripts/gpu_check.py "$@"   # prints the no-CUDA line (or the argument error) and exits
fi

# A venv whose own site-packages come first (quantkit from this tree, the carried wheels), then the
# interpreter's: --system-site-packages alone would skip them where $PY is itself a venv's python.
"$PY" -m venv --clear --without-pip --system-site-packages "$VENV"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import site, sysconfig
p = sysconfig.get_paths()
print("\n".join(dict.fromkeys(site.getsitepackages() + [p["purelib"], p["platlib"]])))' > "$site/_gpu_check_parent_site.pth"

# pip comes from the interpreter's packages (the venv has none of its own); nothing is fetched. Wheels that do
# not fit this interpreter (a cp312 wheel in a dry run on another Python) are left out, and named.
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-index --no-deps)
install() { "${pip[@]}" "$@" > "$VENV/install.log" 2>&1 || { cat "$VENV/install.log" >&2; exit 1; }; }
install --no-build-isolation --config-settings editable_mode=compat -e .
mapfile -t wheels < <("$VENV/bin/python" scripts/gpucheck/wheels.py gpu-wheels)
if [ ${#wheels[@]} -gt 0 ]; then
  install "${wheels[@]}"
  echo "gpu-check: installed ${#wheels[@]} wheel(s) from gpu-wheels/" >&2
fi
"$VENV/bin/python" -c 'import pydantic, gguf, quantkit.cli.main' || {
  echo "gpu-check: quantkit cannot import in $VENV (missing wheels? run scripts/gpu-wheels.sh and carry gpu-wheels/)" >&2
  exit 1
}
exec "$VENV/bin/python" scripts/gpu_check.py "$@"
