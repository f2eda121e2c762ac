// The mean next-token negative log-likelihood llama.cpp computes for a text under a GGUF model,
// every position scored, f32 KV cache: the same number `qlora-studio eval` prints for the model
// it was exported from, compared to the digit by fixtures.sh.
//   nll MODEL.gguf TEXT [bos] [eos] [tokens]   (the BOS token first, the EOS token last, as our text
//   records have them; tokens: print the token ids too)
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * data) { (void) level; (void) text; (void) data; }

int main(int argc, char ** argv) {
    if (argc < 3) { fprintf(stderr, "usage: nll MODEL.gguf TEXT [bos] [eos] [tokens]\n"); return 2; }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "%s: cannot load\n", argv[1]); return 1; }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const char * text = argv[2];
    int cap = (int) strlen(text) + 8;
    llama_token * tokens = malloc(sizeof(llama_token) * cap);
    int bos = 0, eos = 0, print_tokens = 0;
    for (int i = 3; i < argc; i++) {
        bos |= strcmp(argv[i], "bos") == 0; eos |= strcmp(argv[i], "eos") == 0; print_tokens |= strcmp(argv[i], "tokens") == 0;
    }
    if (bos) tokens[0] = llama_vocab_bos(vocab);
    int n = bos + llama_tokenize(vocab, text, (int) strlen(text), tokens + bos, cap - bos - 1, false, false);
    if (eos) tokens[n++] = llama_vocab_eos(vocab);
    if (n < 2) { fprintf(stderr, "tokenize: %d\n", n); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 512;
    cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.n_threads = cp.n_threads_batch = 2;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = tokens[i]; batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    double total = 0;
    for (int i = 0; i + 1 < n; i++) {
        const float * logits = llama_get_logits_ith(ctx, i);
        double max = logits[0], sum = 0;
        for (int v = 1; v < n_vocab; v++) if (logits[v] > max) max = logits[v];
        for (int v = 0; v < n_vocab; v++) sum += exp(logits[v] - max);
        total += max + log(sum) - logits[tokens[i + 1]];
    }
    printf("%.6f %d\n", total / (n - 1), n);
    if (print_tokens) {
        for (int i = 0; i < n; i++) printf("%s%d", i ? " " : "", tokens[i]);
        printf("\n");
    }
    return 0;
}
