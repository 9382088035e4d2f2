// The model's token-embedding table, read from its GGUF file(s): the input rows llama.cpp's
// get_rows would give for some tokens, as floats. The engine decodes an image prompt's text as
// embedding rows in the same llama_decode as the image's rows (native/engine.cpp), which needs them
// on the host; llama.cpp has no public accessor for the table.
#pragma once

#include "llama.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace caprl {

class TokenEmbeddings {
  public:
    // Null if the table cannot be read as n_embd floats per token (not found, a type without a
    // row converter, another width): the engine then keeps an image prompt's text in token batches.
    static std::unique_ptr<TokenEmbeddings> open(const std::string & model_path, int32_t n_embd, int32_t n_vocab);
    ~TokenEmbeddings();
    TokenEmbeddings(const TokenEmbeddings &) = delete;
    TokenEmbeddings & operator=(const TokenEmbeddings &) = delete;

    // Writes n rows of n_embd floats to out; false on a read error or a token out of range.
    bool rows(const llama_token * tokens, int32_t n, float * out) const;

  private:
    TokenEmbeddings() = default;
    int fd_ = -1;
    int type_ = 0;             // ggml_type of the table
    uint64_t offset_ = 0;      // byte offset of token 0's row in the file
    size_t row_bytes_ = 0;
    int32_t n_embd_ = 0;
    int32_t n_vocab_ = 0;
    mutable std::vector<uint8_t> buf_;
};

}  // namespace caprl
