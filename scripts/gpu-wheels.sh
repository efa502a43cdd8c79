#!/usr/bin/env bash
# Downloads into gpu-wheels/ (ignored by git) the wheels that quantkit needs and the lent GPU machines lack,
# for scripts/gpu-check.sh to install there (they have no network). Run it on a machine with registry access.
#
# Which wheels: quantkit's dependencies (pyproject.toml) minus the packages preinstalled there
# (scripts/gpu-preinstalled.txt) and minus `datasets` (it only loads hub data sets, which those machines cannot
# reach; quantkit imports it only for a `name:config:split` --dataset), then their dependency closure, resolved
# for CPython 3.12 on manylinux x86-64 with constraints.txt, minus the preinstalled packages again. Plus
# typing-extensions, whose preinstalled version is unknown and which pydantic needs recent.
# Prints the folder's size and the size of what travels (tree + gpu-wheels/); exits 1 above 64 MiB.
#
#   bash scripts/gpu-wheels.sh            # then: carry gpu-wheels with the tree, run scripts/gpu-check.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=gpu-wheels
LIMIT=$((64 * 1024 * 1024))
SKIP=${GPU_WHEELS_SKIP:-datasets}
EXTRA=${GPU_WHEELS_EXTRA:-typing-extensions}
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. quantkit's direct dependencies that the GPU machine lacks
missing=$("$PY" - "$SKIP" <<'EOF'
import re, sys, tomllib
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pre = {norm(l.strip()) for l in open("scripts/gpu-preinstalled.txt") if l.strip() and not l.startswith("#")}
skip = {norm(s) for s in sys.argv[1].split(",") if s}
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
names = [norm(re.match(r"[A-Za-z0-9_.-]+", d).group()) for d in deps]
print(" ".join(n for n in names if n not in pre and n not in skip))
EOF
)
echo "quantkit's dependencies missing there: ${missing:-none}"
if [ -z "$missing" ]; then rm -rf "$DEST"; mkdir -p "$DEST"; echo "nothing to download"; exit 0; fi

# 2. their closure (metadata only), pinned by constraints.txt, minus what is preinstalled, plus EXTRA
# shellcheck disable=SC2086
"$PY" -m pip install --dry-run --ignore-installed --target "$tmp/target" --quiet --disable-pip-version-check --report "$tmp/report.json" \
    "${PLATFORM[@]}" -c constraints.txt $missing 2> >(grep -v "is ignored: it is neither" >&2)
pins=$("$PY" - "$tmp/report.json" "$EXTRA" <<'EOF'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pre = {norm(l.strip()) for l in open("scripts/gpu-preinstalled.txt") if l.strip() and not l.startswith("#")}
extra = {norm(s) for s in sys.argv[2].split(",") if s}
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if norm(name) not in pre or norm(name) in extra:
        print(f"{name}=={version}")
EOF
)
echo "wheels: $(echo $pins)"

# 3. download them (one version of each), then swap the folder in whole
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps "${PLATFORM[@]}" -d "$tmp/wheels" $pins \
    2> >(grep -v "is ignored: it is neither" >&2)
rm -rf "$DEST"
mv "$tmp/wheels" "$DEST"

# 4. sizes: the wheels, and everything that travels (tracked + untracked-not-ignored files + gpu-wheels/)
wheels=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
total=$((wheels + tree))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu-wheels/: $(ls "$DEST" | wc -l) wheels, $(mib "$wheels"); with the tree ($(mib "$tree")): $(mib "$total") of 64 MiB"
if [ "$total" -gt "$LIMIT" ]; then
  echo "too large to travel: $(mib "$total") > 64 MiB" >&2
  exit 1
fi
