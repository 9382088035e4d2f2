#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace caprl {

std::string token_piece(const llama_vocab * vocab, llama_token token) {
    char buf[256];
    int32_t n = llama_token_to_piece(vocab, token, buf, sizeof(buf), 0, false);
    if (n >= 0) return std::string(buf, n);
    std::string big(-n, '\0');
    n = llama_token_to_piece(vocab, token, big.data(), (int32_t) big.size(), 0, false);
    big.resize(std::max(n, 0));
    return big;
}

Sampler::Sampler(const llama_vocab * vocab, const SamplingParams & p, const std::vector<llama_token> & eog)
    : vocab_(vocab), eog_(eog) {
    cur_.resize(llama_vocab_n_tokens(vocab));

    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    chain_ = llama_sampler_chain_init(cp);
    if (p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
        // Penalties look at generated tokens only (we accept nothing else into the chain).
        const int32_t window = std::clamp(p.max_tokens, 64, 8192);
        llama_sampler_chain_add(chain_, llama_sampler_init_penalties(llama_vocab_n_tokens(vocab), window, p.repetition_penalty,
                                                                     p.frequency_penalty, p.presence_penalty));
    }
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(chain_, llama_sampler_init_greedy());
        return;
    }
    if (p.top_k > 0) llama_sampler_chain_add(chain_, llama_sampler_init_top_k(p.top_k));
    if (p.top_p < 1.0f) llama_sampler_chain_add(chain_, llama_sampler_init_top_p(p.top_p, 1));
    if (p.min_p > 0.0f) llama_sampler_chain_add(chain_, llama_sampler_init_min_p(p.min_p, 1));
    llama_sampler_chain_add(chain_, llama_sampler_init_temp(p.temperature));
    const uint32_t seed = p.seed < 0 ? LLAMA_DEFAULT_SEED : static_cast<uint32_t>(p.seed);
    llama_sampler_chain_add(chain_, llama_sampler_init_dist(seed));
}

Sampler::~Sampler() {
    if (chain_) llama_sampler_free(chain_);
}

llama_token Sampler::sample(llama_context * ctx, int32_t idx, bool suppress_eog, TokenLogprob * lp, int32_t n_top) {
    const float * logits = llama_get_logits_ith(ctx, idx);
    const int32_t n_vocab = (int32_t) cur_.size();
    for (llama_token t = 0; t < n_vocab; t++) cur_[t] = {t, logits[t], 0.0f};
    if (suppress_eog) {
        for (llama_token t : eog_) cur_[t].logit = -INFINITY;
    }
    llama_token_data_array arr{cur_.data(), cur_.size(), -1, false};
    llama_sampler_apply(chain_, &arr);
    const llama_token tok = arr.data[arr.selected].id;
    llama_sampler_accept(chain_, tok);

    if (lp) {
        // Log-probabilities of the model's own distribution (raw logits), as vLLM reports them.
        float max_l = -INFINITY;
        for (int32_t t = 0; t < n_vocab; t++) max_l = std::max(max_l, logits[t]);
        double sum = 0.0;
        for (int32_t t = 0; t < n_vocab; t++) sum += std::exp((double) logits[t] - max_l);
        const float log_z = max_l + (float) std::log(sum);
        lp->token = tok;
        lp->text = token_piece(vocab_, tok);
        lp->logprob = logits[tok] - log_z;
        lp->top.clear();
        if (n_top > 0) {
            std::vector<int32_t> ids(n_vocab);
            std::iota(ids.begin(), ids.end(), 0);
            const int32_t k = std::min(n_top, n_vocab);
            std::partial_sort(ids.begin(), ids.begin() + k, ids.end(),
                              [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
            for (int32_t i = 0; i < k; i++) {
                lp->top.push_back({ids[i], token_piece(vocab_, ids[i]), logits[ids[i]] - log_z});
            }
        }
    }
    return tok;
}

}  // namespace caprl
