/* ggml-act-quant: quantize float32 rows the way ggml's CPU matmul quantizes a weight's activations (the CPU
 * type traits' from_float for Q8_0 / Q8_1 / Q8_K, the build's own SIMD path) and write the decoded values
 * (codes x scale, float32), for checking quantkit.methods.gptq.activations (session 15). Not built by any make target:
 *   cc -O2 -I.llamacpp/src/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/include scripts/ggml-act-quant.c \
 *      .llamacpp/build/ggml/src/libggml-cpu.a .llamacpp/build/ggml/src/libggml-base.a \
 *      -lstdc++ -lm -lpthread -fopenmp -o .llamacpp/bin/ggml-act-quant
 *   ggml-act-quant TYPE_ID NROWS NCOLS IN.f32 OUT.f32     (TYPE_ID 8 = Q8_0, 9 = Q8_1, 15 = Q8_K) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-cpu.h"
int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: %s TYPE_ID NROWS NCOLS IN.f32 OUT.f32\n", argv[0]); return 2; }
    enum ggml_type type = (enum ggml_type) atoi(argv[1]);
    long nrows = atol(argv[2]), ncols = atol(argv[3]);
    float *in = malloc(sizeof(float) * nrows * ncols), *out = malloc(sizeof(float) * nrows * ncols);
    FILE *f = fopen(argv[4], "rb");
    if (!f || fread(in, sizeof(float), nrows * ncols, f) != (size_t) (nrows * ncols)) return 2;
    fclose(f);
    ggml_cpu_init();
    size_t rs = ggml_row_size(type, ncols);
    uint8_t *row = malloc(rs);
    long blk = type == GGML_TYPE_Q8_K ? 256 : 32;
    for (long r = 0; r < nrows; r++) {
        ggml_get_type_traits_cpu(type)->from_float(in + r * ncols, row, ncols);
        for (long b = 0; b < ncols / blk; b++) {
            float d;
            const int8_t *qs;
            if (type == GGML_TYPE_Q8_K) {  /* float d; int8 qs[256]; int16 bsums[16] */
                const uint8_t *p = row + b * (4 + 256 + 32);
                memcpy(&d, p, 4);
                qs = (const int8_t *) (p + 4);
            } else {                       /* ggml_half d; (Q8_1: ggml_half s;) int8 qs[32] */
                const uint8_t *p = row + b * (type == GGML_TYPE_Q8_1 ? 36 : 34);
                ggml_fp16_t h;
                memcpy(&h, p, 2);
                d = ggml_fp16_to_fp32(h);
                qs = (const int8_t *) (p + (type == GGML_TYPE_Q8_1 ? 4 : 2));
            }
            for (long j = 0; j < blk; j++) out[r * ncols + b * blk + j] = qs[j] * d;
        }
    }
    f = fopen(argv[5], "wb");
    fwrite(out, sizeof(float), nrows * ncols, f);
    fclose(f);
    return 0;
}
