#include "token-embeddings.h"

#include "ggml.h"
#include "gguf.h"

#include <cstring>
#include <fcntl.h>
#include <unistd.h>

namespace caprl {

namespace {

constexpr const char * kTable = "token_embd.weight";

// The GGUF of a (possibly split) model that holds the table, opened with its tensor metadata in
// *meta (each file's header parsed once); null if none holds it.
gguf_context * open_file_with_table(const std::string & model_path, ggml_context ** meta, std::string & path) {
    gguf_init_params p{true, meta};
    gguf_context * g = gguf_init_from_file(model_path.c_str(), p);
    if (!g) return nullptr;
    path = model_path;
    if (gguf_find_tensor(g, kTable) >= 0) return g;
    const int64_t k = gguf_find_key(g, "split.count");
    const int count = k >= 0 ? gguf_get_val_u16(g, k) : 1;
    gguf_free(g);
    ggml_free(*meta);
    *meta = nullptr;
    // llama.cpp's split naming: <prefix>-00001-of-0000N.gguf
    char prefix[4096];
    if (count <= 1 || llama_split_prefix(prefix, sizeof(prefix), model_path.c_str(), 0, count) <= 0) return nullptr;
    for (int i = 1; i < count; i++) {
        char split[4096];
        llama_split_path(split, sizeof(split), prefix, i, count);
        gguf_context * s = gguf_init_from_file(split, p);
        if (!s) continue;
        if (gguf_find_tensor(s, kTable) >= 0) {
            path = split;
            return s;
        }
        gguf_free(s);
        ggml_free(*meta);
        *meta = nullptr;
    }
    return nullptr;
}

}  // namespace

std::unique_ptr<TokenEmbeddings> TokenEmbeddings::open(const std::string & model_path, int32_t n_embd, int32_t n_vocab) {
    ggml_context * meta = nullptr;
    std::string path;
    gguf_context * g = open_file_with_table(model_path, &meta, path);
    if (!g) return nullptr;
    std::unique_ptr<TokenEmbeddings> t(new TokenEmbeddings());
    const int64_t id = gguf_find_tensor(g, kTable);
    const ggml_tensor * table = ggml_get_tensor(meta, kTable);
    bool ok = table && table->ne[0] == n_embd && table->ne[1] >= n_vocab;
    if (ok) {
        t->type_ = (int) table->type;
        t->offset_ = gguf_get_data_offset(g) + gguf_get_tensor_offset(g, id);
        t->row_bytes_ = ggml_row_size(table->type, n_embd);
        t->n_embd_ = n_embd;
        t->n_vocab_ = n_vocab;
        ok = table->type == GGML_TYPE_F32 || ggml_get_type_traits(table->type)->to_float != nullptr;
    }
    gguf_free(g);
    ggml_free(meta);
    if (!ok) return nullptr;
    t->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (t->fd_ < 0) return nullptr;
    t->buf_.resize(t->row_bytes_);
    return t;
}

TokenEmbeddings::~TokenEmbeddings() {
    if (fd_ >= 0) ::close(fd_);
}

bool TokenEmbeddings::rows(const llama_token * tokens, int32_t n, float * out) const {
    const ggml_type type = (ggml_type) type_;
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab_) return false;
        const off_t at = (off_t) (offset_ + (uint64_t) tokens[i] * row_bytes_);
        // Rows of a few KB, a few dozen per prompt: from the page cache, the model file was just read.
        if (pread(fd_, buf_.data(), row_bytes_, at) != (ssize_t) row_bytes_) return false;
        float * dst = out + (size_t) i * n_embd_;
        if (type == GGML_TYPE_F32) {
            memcpy(dst, buf_.data(), row_bytes_);
        } else {
            ggml_get_type_traits(type)->to_float(buf_.data(), dst, n_embd_);
        }
    }
    return true;
}

}  // namespace caprl
