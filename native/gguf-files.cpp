#include "gguf-files.h"

#include "llama.h"

namespace caprl {

namespace {

// One file: its header and tensor metadata, freed on return.
bool visit(const std::string & path, const GgufFileFn & fn, int * split_count) {
    ggml_context * meta = nullptr;
    gguf_init_params p{true, &meta};
    gguf_context * g = gguf_init_from_file(path.c_str(), p);
    if (!g) return false;
    if (split_count) {
        const int64_t k = gguf_find_key(g, "split.count");
        *split_count = k >= 0 ? gguf_get_val_u16(g, k) : 1;
    }
    const bool found = fn(path, g, meta);
    gguf_free(g);
    ggml_free(meta);
    return found;
}

}  // namespace

bool find_in_model_files(const std::string & model_path, const GgufFileFn & fn) {
    int count = 1;
    if (visit(model_path, fn, &count)) return true;
    char prefix[4096];
    if (count <= 1 || llama_split_prefix(prefix, sizeof(prefix), model_path.c_str(), 0, count) <= 0) return false;
    for (int i = 1; i < count; i++) {
        char split[4096];
        llama_split_path(split, sizeof(split), prefix, i, count);
        if (visit(split, fn, nullptr)) return true;
    }
    return false;
}

}  // namespace caprl
