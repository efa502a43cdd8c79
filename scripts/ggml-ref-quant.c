/* ggml-ref-quant: quantize rows of float32 with ggml's own ggml_quantize_chunk (the routine llama-quantize calls),
 * for quantkit's encoder comparison (tests/unit/test_gguf_vs_ggml.py). Built by scripts/setup-llamacpp-tools.sh
 * against the static ggml-base library of the vendored llama.cpp.
 *   ggml-ref-quant TYPE_ID NROWS NCOLS IN.f32 OUT.bin [IMATRIX.f32]
 * IN.f32: NROWS*NCOLS little-endian float32; IMATRIX.f32: NCOLS float32 (quant_weights); OUT.bin: the blocks. */
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"

static void *read_all(const char *path, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    void *buf = malloc(n);
    if (fread(buf, 1, n, f) != n) { fprintf(stderr, "%s: short read\n", path); exit(2); }
    fclose(f);
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: %s TYPE_ID NROWS NCOLS IN.f32 OUT.bin [IMATRIX.f32]\n", argv[0]); return 2; }
    enum ggml_type type = (enum ggml_type) atoi(argv[1]);
    long nrows = atol(argv[2]), ncols = atol(argv[3]);
    float *src = read_all(argv[4], sizeof(float) * nrows * ncols);
    float *imatrix = argc > 6 ? read_all(argv[6], sizeof(float) * ncols) : NULL;
    size_t size = ggml_row_size(type, ncols) * nrows;
    void *dst = malloc(size);
    ggml_quantize_init(type);
    size_t done = ggml_quantize_chunk(type, src, dst, 0, nrows, ncols, imatrix);
    if (done != size) { fprintf(stderr, "wrote %zu bytes, expected %zu\n", done, size); return 1; }
    FILE *f = fopen(argv[5], "wb");
    if (!f || fwrite(dst, 1, size, f) != size) { perror(argv[5]); return 1; }
    fclose(f);
    return 0;
}
