// The reference bytes of tests/data/k_quants: ggml's own Q4_K, Q5_K and Q6_K quantization
// (ggml_quantize_chunk without an importance matrix, which is what llama-quantize runs) of a
// fixed input, against which src/quant/k_quants.rs is checked byte for byte in CI.
// The input: ROWS × COLS values from a 32-bit LCG, shaped like weights (mostly small, a few
// outliers, some all-zero and constant blocks), generated the same way by the Rust test.
//   cc kquant_reference.c -I$LLAMA/ggml/include -L$LLAMA_BUILD/bin -lggml-base -o kq && ./kq OUT_DIR
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"

#define ROWS 6
#define COLS 512

static float value(uint32_t * state, int row, int col) {
    *state = *state * 1664525u + 1013904223u;
    float u = (float) (*state >> 8) / 16777216.0f - 0.5f;  // [-0.5, 0.5)
    if (row == 4 && col < 256) return 0.0f;                // an all-zero block
    if (row == 4) return 0.25f;                            // a constant block
    if (row == 5) return u * 1e-3f + (col % 97 == 0 ? 0.5f : 0.0f);  // tiny values, rare outliers
    return u * (row + 1) * 0.02f + (col % 61 == 0 ? u * 0.3f : 0.0f);
}

int main(int argc, char ** argv) {
    if (argc != 2) { fprintf(stderr, "usage: kq OUT_DIR\n"); return 2; }
    static float src[ROWS * COLS];
    uint32_t state = 12345u;
    for (int r = 0; r < ROWS; r++) for (int c = 0; c < COLS; c++) src[r * COLS + c] = value(&state, r, c);
    const enum ggml_type types[3] = { GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K };
    const char * names[3] = { "q4_k", "q5_k", "q6_k" };
    static uint8_t dst[ROWS * COLS * 4];
    for (int t = 0; t < 3; t++) {
        size_t n = ggml_quantize_chunk(types[t], src, dst, 0, ROWS, COLS, NULL);
        char path[4096];
        snprintf(path, sizeof path, "%s/%s.bin", argv[1], names[t]);
        FILE * f = fopen(path, "wb");
        if (!f || fwrite(dst, 1, n, f) != n) { perror(path); return 1; }
        fclose(f);
        printf("%s: %zu bytes\n", path, n);
    }
    return 0;
}
