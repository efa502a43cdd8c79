/* ggml-ref-dequant: dequantize rows of a GGUF tensor's raw bytes with ggml's own to_float (what llama.cpp runs), for
 * checking benchmarks/gguf_floor.py's dequantized files (session 13). Not built by any make target:
 *   cc -O2 -I.llamacpp/src/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/include scripts/ggml-ref-dequant.c \
 *      .llamacpp/build/ggml/src/libggml-base.a -lstdc++ -lm -lpthread -fopenmp -o .llamacpp/bin/ggml-ref-dequant
 *   ggml-ref-dequant TYPE_ID NROWS NCOLS IN.bin OUT.f32 */
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: %s TYPE_ID NROWS NCOLS IN.bin OUT.f32\n", argv[0]); return 2; }
    enum ggml_type type = (enum ggml_type) atoi(argv[1]);
    long nrows = atol(argv[2]), ncols = atol(argv[3]);
    size_t n = ggml_row_size(type, ncols) * nrows;
    void *buf = malloc(n); FILE *f = fopen(argv[4], "rb");
    if (!f || fread(buf, 1, n, f) != n) return 2; fclose(f);
    float *out = malloc(sizeof(float) * nrows * ncols);
    const struct ggml_type_traits *tr = ggml_get_type_traits(type);
    for (long r = 0; r < nrows; r++) tr->to_float((char *) buf + r * ggml_row_size(type, ncols), out + r * ncols, ncols);
    f = fopen(argv[5], "wb"); fwrite(out, sizeof(float), nrows * ncols, f); fclose(f);
    return 0;
}
