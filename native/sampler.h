// One request's sampler: llama.cpp's sampler chain over the logits of its batch row,
// plus end-of-generation suppression (min_tokens, ignore_eos) and log-probabilities.
#pragma once

#include "llama.h"
#include "types.h"

#include <vector>

namespace caprl {

class Sampler {
  public:
    // eog: the vocabulary's end-of-generation tokens, computed once by the engine.
    Sampler(const llama_vocab * vocab, const SamplingParams & params, const std::vector<llama_token> & eog);
    ~Sampler();
    Sampler(const Sampler &) = delete;
    Sampler & operator=(const Sampler &) = delete;

    // Samples from row `idx` of the context's last logits. With suppress_eog the
    // end-of-generation tokens cannot be chosen. If `lp` is given, fills it with the
    // chosen token's log-probability under the model and the top `n_top` alternatives.
    llama_token sample(llama_context * ctx, int32_t idx, bool suppress_eog, TokenLogprob * lp, int32_t n_top);

  private:
    const llama_vocab * vocab_;
    llama_sampler * chain_ = nullptr;
    const std::vector<llama_token> & eog_;
    std::vector<llama_token_data> cur_;
};

// The text of one token as the API shows it (special tokens render empty).
std::string token_piece(const llama_vocab * vocab, llama_token token);

}  // namespace caprl
