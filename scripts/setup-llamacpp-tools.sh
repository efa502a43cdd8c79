#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) into .llamacpp/bin
# from the llama.cpp source that the llama-cpp-python sdist vendors, plus ggml-ref-quant (scripts/ggml-ref-quant.c:
# ggml's own quantizer on raw rows, for the encoder comparison test). They are the judge of benchmarks/gguf_judge.py;
# quantkit itself never needs them. About 15 minutes on 2 free cores (ggml-ref-quant comes first, in a few).
# `--ref-only` builds ggml-ref-quant alone (ggml's base library: a few minutes), for CI's encoder comparison.
# Idempotent: a second run only checks that the tools exist.
set -euo pipefail
REF_ONLY=0; [ "${1:-}" = "--ref-only" ] && REF_ONLY=1
cd "$(dirname "$0")/.."
DEST=${LLAMACPP_TOOLS:-.llamacpp}
VERSION=${LLAMACPP_PY_VERSION:-0.3.36}
PY=${PYTHON:-python3}
TOOLS=(llama-quantize llama-imatrix llama-perplexity)
have_all() { for t in "${TOOLS[@]}" ggml-ref-quant; do [ -x "$DEST/bin/$t" ] || return 1; done; }
if have_all || { [ "$REF_ONLY" = 1 ] && [ -x "$DEST/bin/ggml-ref-quant" ]; }; then echo "llama.cpp tools ready in $DEST/bin"; exit 0; fi
mkdir -p "$DEST/src" "$DEST/bin"
if [ ! -d "$DEST/src/llama_cpp_python-$VERSION" ]; then
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
      -d "$DEST/src" "llama-cpp-python==$VERSION"
  tar -xzf "$DEST/src/llama_cpp_python-$VERSION.tar.gz" -C "$DEST/src"
fi
SRC="$DEST/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$DEST/build" --config Release -j "$JOBS" --target ggml-base
cc -O2 -I"$SRC/ggml/include" scripts/ggml-ref-quant.c "$DEST/build/ggml/src/libggml-base.a" \
    -lstdc++ -lm -lpthread -fopenmp -o "$DEST/bin/ggml-ref-quant"
if [ "$REF_ONLY" = 1 ]; then echo "ggml-ref-quant ready in $DEST/bin"; exit 0; fi
cmake --build "$DEST/build" --config Release -j "$JOBS" --target "${TOOLS[@]}"
for t in "${TOOLS[@]}"; do cp "$DEST/build/bin/$t" "$DEST/bin/$t"; done
have_all && echo "llama.cpp tools ready in $DEST/bin"
