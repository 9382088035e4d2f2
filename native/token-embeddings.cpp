#include "token-embeddings.h"

#include "gguf-files.h"

#include <cstring>
#include <fcntl.h>
#include <unistd.h>

namespace caprl {

namespace {

constexpr const char * kTable = "token_embd.weight";

}  // namespace

std::unique_ptr<TokenEmbeddings> TokenEmbeddings::open(const std::string & model_path, int32_t n_embd, int32_t n_vocab) {
    std::unique_ptr<TokenEmbeddings> t(new TokenEmbeddings());
    std::string path;
    bool ok = false;
    // The file of a (possibly split) model that holds the table.
    find_in_model_files(model_path, [&](const std::string & file, const gguf_context * g, const ggml_context * meta) {
        const int64_t id = gguf_find_tensor(g, kTable);
        if (id < 0) return false;
        const ggml_tensor * table = ggml_get_tensor(const_cast<ggml_context *>(meta), kTable);
        path = file;
        ok = table && table->ne[0] == n_embd && table->ne[1] >= n_vocab;
        if (ok) {
            t->type_ = (int) table->type;
            t->offset_ = gguf_get_data_offset(g) + gguf_get_tensor_offset(g, id);
            t->row_bytes_ = ggml_row_size(table->type, n_embd);
            t->n_embd_ = n_embd;
            t->n_vocab_ = n_vocab;
            ok = table->type == GGML_TYPE_F32 || ggml_get_type_traits(table->type)->to_float != nullptr;
        }
        return true;
    });
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
