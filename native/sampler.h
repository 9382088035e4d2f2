// One request's sampler over the logits of its batch row, plus end-of-generation suppression
// (min_tokens, ignore_eos) and log-probabilities.
//
// Sampling runs on the engine thread between two decode steps, once per running sequence, so
// its cost adds straight to the time per output token. llama.cpp's sampler chain first copies the
// whole vocabulary into a candidate array (151,936 entries for Qwen) and its softmax and top-p
// sort all of it; measured on one core, 0.5 ms (greedy) to 13 ms (top-p) per token. Without
// penalties we select directly on the logits (argmax; top-k by selection; top-p over a growing
// sorted head), drawing from the same distribution as the chain; penalties keep the chain.
#pragma once

#include "llama.h"
#include "types.h"

#include <random>
#include <vector>

namespace caprl {

// The vocabulary's end-of-generation tokens, as a list and as a per-token mask, built once per
// model and shared by every Sampler (the mask is 151,936 bytes for Qwen).
struct EogTokens {
    EogTokens(std::vector<llama_token> tokens, int32_t n_vocab);
    std::vector<llama_token> list;
    std::vector<uint8_t> mask;  // per token: 1 for an end-of-generation token
};

class Sampler {
  public:
    // Auto: the direct path unless penalties need the chain. Chain: always the chain (to compare).
    enum class Path { Auto, Chain };
    // eog outlives the Sampler. vocab may be null (benchmarks): then log-probability texts are empty.
    Sampler(const llama_vocab * vocab, int32_t n_vocab, const SamplingParams & params, const EogTokens & eog,
            Path path = Path::Auto);
    ~Sampler();
    Sampler(const Sampler &) = delete;
    Sampler & operator=(const Sampler &) = delete;

    // Samples from one row of logits (n_vocab floats). With suppress_eog the end-of-generation
    // tokens cannot be chosen. If `lp` is given, fills it with the chosen token's log-probability
    // under the model and the top `n_top` alternatives. Different Samplers may run concurrently.
    llama_token sample(const float * logits, bool suppress_eog, TokenLogprob * lp, int32_t n_top);

    // Whether this sampler runs llama.cpp's chain (penalties) rather than the direct path.
    bool uses_chain() const { return chain_ != nullptr; }

  private:
    llama_token sample_chain(const float * logits, bool suppress_eog);
    llama_token sample_direct(const float * logits, bool suppress_eog);
    void cut_top_p(const float * l, float m);
    void fill_logprobs(const float * logits, llama_token tok, TokenLogprob & lp, int32_t n_top) const;

    const llama_vocab * vocab_;
    int32_t n_vocab_;
    SamplingParams p_;
    const EogTokens & eog_;
    llama_sampler * chain_ = nullptr;       // penalties only
    std::vector<llama_token_data> cur_;     // the chain's candidates
    // Direct path scratch, reused across tokens.
    std::vector<float> masked_;     // logits with end-of-generation tokens removed
    std::vector<int32_t> cand_;     // candidate tokens
    std::vector<float> weight_;
    std::vector<double> block_sum_;  // weight sums per block of 64 tokens
    std::vector<int32_t> count_;    // tokens per logit bucket
    std::vector<double> mass_;      // probability mass per logit bucket
    std::mt19937 rng_;
};

// The text of one token as the API shows it (special tokens render empty).
std::string token_piece(const llama_vocab * vocab, llama_token token);

}  // namespace caprl
