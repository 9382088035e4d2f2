#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace caprl {

std::string token_piece(const llama_vocab * vocab, llama_token token) {
    if (!vocab) return std::string();
    char buf[256];
    int32_t n = llama_token_to_piece(vocab, token, buf, sizeof(buf), 0, false);
    if (n >= 0) return std::string(buf, n);
    std::string big(-n, '\0');
    n = llama_token_to_piece(vocab, token, big.data(), (int32_t) big.size(), 0, false);
    big.resize(std::max(n, 0));
    return big;
}

// exp(x) for x <= 0 with a relative error below 5e-6 (sampling weights need no more): 2^(x log2 e)
// as a power of two, taken from the bits of a rounded float, times a degree-6 polynomial. No
// branches and no float-to-int conversion, so loops over the vocabulary vectorize (CMakeLists.txt
// builds this file with -fno-trapping-math, without which GCC keeps the selects scalar).
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float big = t + 12582912.0f;  // 1.5 * 2^23: rounds t to an integer held in the low bits
    int32_t n_int;
    std::memcpy(&n_int, &big, sizeof n_int);
    n_int -= 0x4B400000;
    const float f = (t - (big - 12582912.0f)) * 0.69314718055994531f;  // in [-ln2/2, ln2/2]
    const float poly = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
    const int32_t bits = (n_int + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return poly * scale;
}

constexpr int32_t kBlock = 64;

// Reductions over the vocabulary are written with independent lanes so that they vectorize
// without -ffast-math (which would let the compiler reorder them itself).
static float max_of(const float * l, int32_t n) {
    float lane[8];
    for (float & x : lane) x = -INFINITY;
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) lane[k] = lane[k] > l[i + k] ? lane[k] : l[i + k];
    }
    float m = -INFINITY;
    for (; i < n; i++) m = std::max(m, l[i]);
    for (float x : lane) m = std::max(m, x);
    return m;
}

// w[i] = exp((l[i] - m) * s) for every i, and the sum of each block of kBlock weights (so a draw
// scans blocks first). Returns the total.
static double exp_weights(const float * l, int32_t n, float m, float s, float * w, std::vector<double> & block_sum) {
    for (int32_t i = 0; i < n; i++) w[i] = exp_nonpositive((l[i] - m) * s);
    block_sum.assign((n + kBlock - 1) / kBlock, 0.0);
    double total = 0.0;
    for (int32_t b = 0; b * kBlock < n; b++) {
        const int32_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
        float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int32_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            for (int k = 0; k < 8; k++) lane[k] += w[i + k];
        }
        double sum = 0.0;
        for (; i < hi; i++) sum += w[i];
        for (float x : lane) sum += x;
        block_sum[b] = sum;
        total += sum;
    }
    return total;
}

// The index where the running sum of w passes r (r < total), via the block sums.
static int32_t draw_index(const float * w, int32_t n, const std::vector<double> & block_sum, double r) {
    int32_t b = 0;
    const int32_t nb = (int32_t) block_sum.size();
    for (; b < nb - 1 && r >= block_sum[b]; b++) r -= block_sum[b];
    int32_t last = -1;
    for (int32_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); i++) {
        if (w[i] <= 0.0f) continue;
        last = i;
        r -= w[i];
        if (r < 0.0) return i;
    }
    return last;  // rounding left r >= 0: the block's last token with weight
}

namespace {

bool has_penalties(const SamplingParams & p) {
    return p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
}

// First index of the largest logit among the allowed tokens (ties: the lowest id, as llama.cpp's greedy).
llama_token argmax(const float * logits, int32_t n, const std::vector<uint8_t> * suppressed) {
    const float m = max_of(logits, n);
    llama_token best = 0;
    while (best < n - 1 && !(logits[best] == m)) best++;
    if (!suppressed || !(*suppressed)[best]) return best;
    // The best is an end-of-generation token that may not end the text yet: skip them.
    best = -1;
    float best_l = -INFINITY;
    for (int32_t t = 0; t < n; t++) {
        if (!(*suppressed)[t] && (best < 0 || logits[t] > best_l)) {
            best_l = logits[t];
            best = t;
        }
    }
    return std::max(best, 0);
}

}  // namespace

EogTokens::EogTokens(std::vector<llama_token> tokens, int32_t n_vocab) : mask(n_vocab, 0) {
    for (llama_token t : tokens) {
        if (t >= 0 && t < n_vocab) {
            list.push_back(t);
            mask[t] = 1;
        }
    }
}

Sampler::Sampler(const llama_vocab * vocab, int32_t n_vocab, const SamplingParams & p, const EogTokens & eog, Path path)
    : vocab_(vocab), n_vocab_(n_vocab), p_(p), eog_(eog) {
    rng_.seed(p.seed < 0 ? std::random_device{}() : static_cast<uint32_t>(p.seed));
    if (!has_penalties(p) && path != Path::Chain) return;

    // Penalties depend on the tokens generated so far: llama.cpp's chain keeps that state.
    cur_.resize(n_vocab_);
    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    chain_ = llama_sampler_chain_init(cp);
    const int32_t window = std::clamp(p.max_tokens, 64, 8192);
    if (has_penalties(p)) {
        llama_sampler_chain_add(chain_, llama_sampler_init_penalties(n_vocab_, window, p.repetition_penalty,
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

llama_token Sampler::sample(const float * logits, bool suppress_eog, TokenLogprob * lp, int32_t n_top) {
    const llama_token tok = chain_ ? sample_chain(logits, suppress_eog) : sample_direct(logits, suppress_eog);
    if (lp) fill_logprobs(logits, tok, *lp, n_top);
    return tok;
}

llama_token Sampler::sample_chain(const float * logits, bool suppress_eog) {
    for (llama_token t = 0; t < n_vocab_; t++) cur_[t] = {t, logits[t], 0.0f};
    if (suppress_eog) {
        for (llama_token t : eog_.list) cur_[t].logit = -INFINITY;
    }
    llama_token_data_array arr{cur_.data(), cur_.size(), -1, false};
    llama_sampler_apply(chain_, &arr);
    const llama_token tok = arr.data[arr.selected].id;
    llama_sampler_accept(chain_, tok);
    return tok;
}

namespace {

// Candidates ordered by logit, then id (so that draws are reproducible).
struct Higher {
    const float * l;
    bool operator()(int32_t a, int32_t b) const { return l[a] > l[b] || (l[a] == l[b] && a < b); }
};

// Logit buckets below the maximum, finest near the top: the top-k and top-p cuts find their
// bucket in one pass over the vocabulary and sort only the tokens of that bucket.
constexpr int kBuckets = 4096;
constexpr float kRange = 64.0f;  // logits more than this below the maximum share the last bucket

inline int bucket_of(float l, float m) {
    const float d = (m - l) * (kBuckets / kRange);
    return d >= (float) (kBuckets - 1) ? kBuckets - 1 : (int) d;
}

}  // namespace

// top-p over the current candidates (the top-k, sorted) or, with none, over the vocabulary: the
// shortest head in descending order whose softmax mass reaches top_p.
void Sampler::cut_top_p(const float * l, float m) {
    const Higher higher{l};
    if (!cand_.empty()) {
        // Softmax over the k candidates, then the shortest head whose mass reaches top_p.
        double z = 0.0;
        for (int32_t t : cand_) z += exp_nonpositive(l[t] - m);
        double cum = 0.0;
        size_t keep = cand_.size();
        for (size_t i = 0; i < cand_.size(); i++) {
            cum += exp_nonpositive(l[cand_[i]] - m) / z;
            if (cum >= p_.top_p) {
                keep = i + 1;
                break;
            }
        }
        cand_.resize(keep);
    } else {
        const double z = exp_weights(l, n_vocab_, m, 1.0f, weight_.data(), block_sum_);
        // A trained model's nucleus sits within a few nats of the top: if the tokens there
        // hold top_p of the mass, it is among them, and only they are sorted.
        const float near = m - 12.0f;
        double near_mass = 0.0;
        for (int32_t t = 0; t < n_vocab_; t++) {
            if (l[t] >= near) {
                cand_.push_back(t);
                near_mass += weight_[t];
            }
        }
        if (cand_.size() < 4096 && near_mass / z >= p_.top_p) {
            std::sort(cand_.begin(), cand_.end(), higher);
            double cum = 0.0;
            size_t keep = cand_.size();
            for (size_t i = 0; i < cand_.size(); i++) {
                cum += weight_[cand_[i]];
                if (cum / z >= p_.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            cand_.resize(keep);
            return;
        }
        cand_.clear();
        // Otherwise, over the vocabulary: the mass of each logit bucket, the bucket where the
        // running mass reaches top_p; tokens above it are in, that bucket is sorted and cut.
        mass_.assign(kBuckets, 0.0);
        for (int32_t t = 0; t < n_vocab_; t++) mass_[bucket_of(l[t], m)] += weight_[t];
        double cum = 0.0;
        int b = 0;
        for (; b < kBuckets - 1; b++) {
            if ((cum + mass_[b]) / z >= p_.top_p) break;
            cum += mass_[b];
        }
        for (int32_t t = 0; t < n_vocab_; t++) {
            if (bucket_of(l[t], m) < b) cand_.push_back(t);
        }
        const size_t first_of_b = cand_.size();
        for (int32_t t = 0; t < n_vocab_; t++) {
            if (bucket_of(l[t], m) == b) cand_.push_back(t);
        }
        std::sort(cand_.begin() + first_of_b, cand_.end(), higher);
        size_t keep = cand_.size();
        for (size_t i = first_of_b; i < cand_.size(); i++) {
            cum += weight_[cand_[i]];
            if (cum / z >= p_.top_p) {
                keep = i + 1;
                break;
            }
        }
        cand_.resize(std::max<size_t>(keep, 1));
    }
}

// The chain's filters in its order (top-k, top-p, min-p on the untempered distribution, then the
// temperature), computed on the candidates they can keep rather than on the whole vocabulary.
llama_token Sampler::sample_direct(const float * logits, bool suppress_eog) {
    const std::vector<uint8_t> * sup = suppress_eog ? &eog_.mask : nullptr;
    if (p_.temperature <= 0.0f) return argmax(logits, n_vocab_, sup);
    const float * l = logits;
    if (sup) {
        // End-of-generation tokens may not be drawn yet: a copy where they weigh nothing.
        masked_.assign(logits, logits + n_vocab_);
        for (llama_token t : eog_.list) masked_[t] = -INFINITY;
        l = masked_.data();
    }
    const float inv_t = 1.0f / p_.temperature;
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    const float m = max_of(l, n_vocab_);
    if (!(m > -INFINITY)) return argmax(logits, n_vocab_, nullptr);

    const bool top_k = p_.top_k > 0 && p_.top_k < n_vocab_;
    const bool top_p = p_.top_p < 1.0f;
    const bool min_p = p_.min_p > 0.0f;
    weight_.resize(n_vocab_);
    if (!top_k && !top_p && !min_p) {
        // The whole vocabulary: one pass of weights, one draw, one scan.
        const double sum = exp_weights(l, n_vocab_, m, inv_t, weight_.data(), block_sum_);
        const int32_t t = draw_index(weight_.data(), n_vocab_, block_sum_, uniform(rng_) * sum);
        return t >= 0 ? t : argmax(l, n_vocab_, nullptr);
    }

    // Candidates, in descending order once a cut needs the order.
    cand_.clear();
    Higher higher{l};
    if (top_k && p_.top_k <= 256) {
        // A min-heap of the k best so far: most tokens cost one comparison with its root. Ties
        // keep the lower id (tokens come in id order, and only a strictly higher logit enters).
        // Blocks whose maximum cannot enter are skipped after one vectorized pass.
        auto worse = [&](int32_t a, int32_t b) { return higher(a, b); };  // heap root = lowest candidate
        for (int32_t lo = 0; lo < n_vocab_; lo += kBlock) {
            const int32_t hi = std::min(n_vocab_, lo + kBlock);
            if ((int32_t) cand_.size() == p_.top_k && !(max_of(l + lo, hi - lo) > l[cand_.front()])) continue;
            for (int32_t t = lo; t < hi; t++) {
                if ((int32_t) cand_.size() < p_.top_k) {
                    cand_.push_back(t);
                    std::push_heap(cand_.begin(), cand_.end(), worse);
                } else if (l[t] > l[cand_.front()]) {
                    std::pop_heap(cand_.begin(), cand_.end(), worse);
                    cand_.back() = t;
                    std::push_heap(cand_.begin(), cand_.end(), worse);
                }
            }
        }
        std::sort(cand_.begin(), cand_.end(), higher);
    } else if (top_k) {
        // The k-th largest logit's bucket: everything above it is in, that bucket is sorted.
        count_.assign(kBuckets, 0);
        for (int32_t t = 0; t < n_vocab_; t++) count_[bucket_of(l[t], m)]++;
        int b = 0;
        for (int32_t seen = 0; b < kBuckets; b++) {
            seen += count_[b];
            if (seen >= p_.top_k) break;
        }
        for (int32_t t = 0; t < n_vocab_; t++) {
            if (bucket_of(l[t], m) <= b) cand_.push_back(t);
        }
        std::sort(cand_.begin(), cand_.end(), higher);
        cand_.resize(p_.top_k);
    }
    if (top_p) cut_top_p(l, m);
    if (!top_k && !top_p) {
        for (int32_t t = 0; t < n_vocab_; t++) {
            if (l[t] > -INFINITY) cand_.push_back(t);
        }
    }
    float mc = -INFINITY;
    for (int32_t t : cand_) mc = std::max(mc, l[t]);
    if (min_p) {
        // p >= min_p * p_max  <=>  logit >= max_logit + log(min_p); at least one token stays.
        const float floor_l = mc + std::log(p_.min_p);
        size_t w = 0;
        for (int32_t t : cand_) {
            if (l[t] >= floor_l) cand_[w++] = t;
        }
        cand_.resize(std::max<size_t>(w, 1));
    }
    double sum = 0.0;
    for (size_t i = 0; i < cand_.size(); i++) {
        weight_[i] = exp_nonpositive((l[cand_[i]] - mc) * inv_t);
        sum += weight_[i];
    }
    double r = uniform(rng_) * sum;
    for (size_t i = 0; i < cand_.size(); i++) {
        r -= weight_[i];
        if (r < 0.0) return cand_[i];
    }
    return cand_[0];
}

void Sampler::fill_logprobs(const float * logits, llama_token tok, TokenLogprob & lp, int32_t n_top) const {
    // Log-probabilities of the model's own distribution (raw logits), as vLLM reports them.
    float max_l = -INFINITY;
    for (int32_t t = 0; t < n_vocab_; t++) max_l = std::max(max_l, logits[t]);
    double sum = 0.0;
    for (int32_t t = 0; t < n_vocab_; t++) sum += std::exp((double) logits[t] - max_l);
    const float log_z = max_l + (float) std::log(sum);
    lp.token = tok;
    lp.text = token_piece(vocab_, tok);
    lp.logprob = logits[tok] - log_z;
    lp.top.clear();
    if (n_top > 0) {
        std::vector<int32_t> ids(n_vocab_);
        std::iota(ids.begin(), ids.end(), 0);
        const int32_t k = std::min(n_top, n_vocab_);
        std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
        for (int32_t i = 0; i < k; i++) lp.top.push_back({ids[i], token_piece(vocab_, ids[i]), logits[ids[i]] - log_z});
    }
}

}  // namespace caprl
