// TokenEmbeddings (native/token-embeddings.cpp: the engine's host-side read of a model's
// token-embedding table) against ggml's own get_rows on the same tensor, loaded by gguf: every
// tested row must be bit-identical, whatever the table's type. Prints one line; exit 0 = equal.
//   caprl-token-embd-check MODEL.gguf
#include "token-embeddings.h"

#include "ggml-cpu.h"
#include "ggml.h"
#include "gguf.h"

#include <cstdio>
#include <cstring>
#include <vector>

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    ggml_context * data = nullptr;
    gguf_init_params p{false, &data};
    gguf_context * g = gguf_init_from_file(argv[1], p);
    ggml_tensor * table = g ? ggml_get_tensor(data, "token_embd.weight") : nullptr;
    if (!table) {
        fprintf(stderr, "no token_embd.weight in %s\n", argv[1]);
        return 2;
    }
    const int32_t n_embd = (int32_t) table->ne[0];
    const int32_t n_vocab = (int32_t) table->ne[1];
    std::vector<int32_t> ids = {0, 1, 2, 7, n_vocab / 3, n_vocab / 2, n_vocab - 2, n_vocab - 1};

    ggml_init_params cp{ggml_tensor_overhead() * 8 + ggml_graph_overhead() + (ids.size() * (n_embd + 1)) * sizeof(float) + 4096, nullptr, false};
    ggml_context * ctx = ggml_init(cp);
    ggml_tensor * rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) ids.size());
    memcpy(rows->data, ids.data(), ids.size() * sizeof(int32_t));
    ggml_tensor * out = ggml_get_rows(ctx, table, rows);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    if (ggml_graph_compute_with_ctx(ctx, gf, 1) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "get_rows failed\n");
        return 2;
    }

    auto embd = caprl::TokenEmbeddings::open(argv[1], n_embd, n_vocab);
    if (!embd) {
        fprintf(stderr, "TokenEmbeddings::open failed\n");
        return 1;
    }
    std::vector<float> ours(ids.size() * (size_t) n_embd);
    if (!embd->rows(ids.data(), (int32_t) ids.size(), ours.data())) {
        fprintf(stderr, "TokenEmbeddings::rows failed\n");
        return 1;
    }
    const bool equal = memcmp(ours.data(), out->data, ours.size() * sizeof(float)) == 0;
    llama_token bad = n_vocab;
    const bool refuses = !embd->rows(&bad, 1, ours.data());
    printf("%s: %zu rows of %d, %s: %s; token %d %s\n", argv[1], ids.size(), n_embd, ggml_type_name(table->type),
           equal ? "equal to ggml get_rows" : "DIFFERENT from ggml get_rows", bad, refuses ? "refused" : "NOT refused");
    ggml_free(ctx);
    gguf_free(g);
    ggml_free(data);
    return equal && refuses ? 0 : 1;
}
