#include "token-embeddings.h"

#include "ggml.h"
#include "gguf.h"

#include <cstring>
#include <fcntl.h>
#include <unistd.h>

namespace caprl {

namespace {

constexpr const char * kTable = "token_embd.weight";

// The file of a (possibly split) model that holds the table; empty if none does.
std::string file_with_table(const std::string & model_path) {
    gguf_init_params p{true, nullptr};
    gguf_context * g = gguf_init_from_file(model_path.c_str(), p);
    if (!g) return {};
    const bool here = gguf_find_tensor(g, kTable) >= 0;
    const int64_t k = gguf_find_key(g, "split.count");
    const int count = k >= 0 ? gguf_get_val_u16(g, k) : 1;
    gguf_free(g);
    if (here || count <= 1) return here ? model_path : std::string();
    // llama.cpp's split naming: <prefix>-00001-of-0000N.gguf
    char prefix[4096];
    if (llama_split_prefix(prefix, sizeof(prefix), model_path.c_str(), 0, count) <= 0) return {};
    for (int i = 0; i < count; i++) {
        char path[4096];
        llama_split_path(path, sizeof(path), prefix, i, count);
        gguf_context * s = gguf_init_from_file(path, p);
        if (!s) continue;
        const bool found = gguf_find_tensor(s, kTable) >= 0;
        gguf_free(s);
        if (found) return path;
    }
    return {};
}

}  // namespace

std::unique_ptr<TokenEmbeddings> TokenEmbeddings::open(const std::string & model_path, int32_t n_embd, int32_t n_vocab) {
    const std::string path = file_with_table(model_path);
    if (path.empty()) return nullptr;
    ggml_context * meta = nullptr;
    gguf_init_params p{true, &meta};
    gguf_context * g = gguf_init_from_file(path.c_str(), p);
    if (!g) return nullptr;
    std::unique_ptr<TokenEmbeddings> t(new TokenEmbeddings());
    const int64_t id = gguf_find_tensor(g, kTable);
    const ggml_tensor * table = ggml_get_tensor(meta, kTable);
    bool ok = id >= 0 && table && table->ne[0] == n_embd && table->ne[1] >= n_vocab;
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
