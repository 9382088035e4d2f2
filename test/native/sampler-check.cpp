// Checks and times native/sampler.cpp's direct path against llama.cpp's sampler chain.
//   caprl-sampler-check check   distributions of both paths vs an oracle written from the filters'
//                               definitions (fixed seeds: deterministic); greedy equality
//   caprl-sampler-check bench   ms per token at Qwen's vocabulary (151,936), direct vs chain, and
//                               one step's sampling of 32 rows on 1..N threads
// Prints one line per case; exit code 1 if any check fails (test/sampler.test.ts runs it).
#include "sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace caprl;

namespace {

SamplingParams params(float temp, int32_t top_k, float top_p, float min_p, int64_t seed) {
    SamplingParams p;
    p.temperature = temp;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.seed = seed;
    p.max_tokens = 1 << 20;
    return p;
}

// The distribution the filters define: top-k, then top-p and min-p on the untempered softmax of
// what is left, then the temperature. Candidates ordered by logit, then id.
std::vector<double> oracle(const std::vector<float> & l, const SamplingParams & p, const std::vector<uint8_t> & banned) {
    std::vector<int> c;
    for (int t = 0; t < (int) l.size(); t++) if (!banned[t]) c.push_back(t);
    std::sort(c.begin(), c.end(), [&](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    if (p.top_k > 0 && (size_t) p.top_k < c.size()) c.resize(p.top_k);
    if (p.top_p < 1.0f) {
        double z = 0;
        for (int t : c) z += std::exp((double) l[t] - l[c[0]]);
        double cum = 0;
        size_t keep = c.size();
        for (size_t i = 0; i < c.size(); i++) {
            cum += std::exp((double) l[c[i]] - l[c[0]]) / z;
            if (cum >= p.top_p) { keep = i + 1; break; }
        }
        c.resize(keep);
    }
    if (p.min_p > 0.0f) {
        std::vector<int> k;
        for (int t : c) if ((double) l[t] >= (double) l[c[0]] + std::log((double) p.min_p)) k.push_back(t);
        if (!k.empty()) c = k;
    }
    std::vector<double> prob(l.size(), 0.0);
    double z = 0;
    for (int t : c) z += std::exp(((double) l[t] - l[c[0]]) / p.temperature);
    for (int t : c) prob[t] = std::exp(((double) l[t] - l[c[0]]) / p.temperature) / z;
    return prob;
}

int failures = 0;

void report(bool ok, const std::string & name, const std::string & detail) {
    printf("%s %s%s%s\n", ok ? "ok" : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
    if (!ok) failures++;
}

// Empirical frequencies of `n` draws vs the oracle: every token within 5 standard deviations
// (+1e-4), and no token the filters drop ever drawn.
void check_distribution(const std::string & name, const std::vector<float> & l, const SamplingParams & p,
                        const std::vector<llama_token> & eog_list, bool suppress, bool chain, int n = 200000) {
    std::vector<uint8_t> banned(l.size(), 0);
    if (suppress) for (llama_token t : eog_list) banned[t] = 1;
    const std::vector<double> want = oracle(l, p, banned);
    const EogTokens eog(eog_list, (int32_t) l.size());
    Sampler s(nullptr, (int32_t) l.size(), p, eog, chain ? Sampler::Path::Chain : Sampler::Path::Auto);
    std::vector<int> seen(l.size(), 0);
    for (int i = 0; i < n; i++) seen[s.sample(l.data(), suppress, nullptr, 0)]++;
    double worst = 0;
    std::string why;
    for (size_t t = 0; t < l.size(); t++) {
        const double f = (double) seen[t] / n;
        const double sd = std::sqrt(want[t] * (1 - want[t]) / n);
        if (want[t] == 0 && seen[t] > 0) why = "token " + std::to_string(t) + " drawn " + std::to_string(seen[t]) + " times, excluded";
        const double z = std::fabs(f - want[t]) / (sd + 1e-12);
        if (std::fabs(f - want[t]) > 5 * sd + 1e-4) why = "token " + std::to_string(t) + " freq " + std::to_string(f) + " want " + std::to_string(want[t]);
        if (want[t] > 0) worst = std::max(worst, z);
    }
    char buf[64];
    snprintf(buf, sizeof(buf), "max deviation %.2f sd", worst);
    report(why.empty(), name + (chain ? " [llama.cpp chain]" : " [direct]"), why.empty() ? buf : why);
}

int check() {
    // 40 tokens, distinct logits (no ties at any cut), two of them end-of-generation tokens.
    std::vector<float> l(40);
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0, 1.5f);
    for (auto & x : l) x = nd(rng);
    const std::vector<llama_token> eog = {3, 17};
    l[17] = 4.0f;  // the likeliest token is an end-of-generation token
    struct Case { const char * name; float temp; int32_t k; float top_p; float min_p; bool suppress; };
    const Case cases[] = {
        {"temperature 1", 1.0f, 0, 1.0f, 0.0f, false},
        {"temperature 0.7, eog suppressed", 0.7f, 0, 1.0f, 0.0f, true},
        {"top_k 5", 1.0f, 5, 1.0f, 0.0f, false},
        {"top_p 0.8", 1.0f, 0, 0.8f, 0.0f, false},
        {"top_k 10 + top_p 0.9 + temperature 0.5", 0.5f, 10, 0.9f, 0.0f, false},
        {"min_p 0.1", 1.0f, 0, 1.0f, 0.1f, false},
        {"top_p 0.95 + min_p 0.05 + temperature 1.3, eog suppressed", 1.3f, 0, 0.95f, 0.05f, true},
    };
    int64_t seed = 1;
    for (const Case & c : cases) {
        for (bool chain : {false, true}) {
            check_distribution(c.name, l, params(c.temp, c.k, c.top_p, c.min_p, seed++), eog, c.suppress, chain);
        }
    }
    // A flat distribution over many tokens: top-p takes its bucketed path (thousands of tokens
    // near the top), top-k its bucketed selection (k above the heap's limit).
    std::vector<float> wide(6000);
    std::uniform_real_distribution<float> ud(-3.0f, 0.0f);
    for (auto & x : wide) x = ud(rng);
    check_distribution("6000 flat tokens, top_p 0.5", wide, params(1.0f, 0, 0.5f, 0.0f, seed++), eog, false, false, 50000);
    check_distribution("6000 flat tokens, top_k 1000 + top_p 0.7, eog suppressed", wide, params(0.8f, 1000, 0.7f, 0.0f, seed++), eog, true, false, 50000);
    check_distribution("6000 flat tokens, top_k 300", wide, params(1.0f, 300, 1.0f, 0.0f, seed++), eog, false, false, 50000);

    // Greedy: the same token as llama.cpp's greedy sampler on random rows, ties included.
    int differ = 0;
    std::uniform_int_distribution<int> small(0, 4);
    for (int i = 0; i < 2000; i++) {
        std::vector<float> row(1000);
        for (auto & x : row) x = (float) small(rng);  // many ties
        const bool suppress = i % 2 == 0;
        const EogTokens e({(llama_token) (i % 1000), 999}, 1000);
        Sampler direct(nullptr, 1000, params(0.0f, 0, 1.0f, 0.0f, 1), e);
        Sampler chain(nullptr, 1000, params(0.0f, 0, 1.0f, 0.0f, 1), e, Sampler::Path::Chain);
        if (direct.sample(row.data(), suppress, nullptr, 0) != chain.sample(row.data(), suppress, nullptr, 0)) differ++;
    }
    report(differ == 0, "greedy equals llama.cpp's greedy on 2000 rows with ties", std::to_string(differ) + " differ");
    // Same seed, same draws.
    const EogTokens eog40(eog, 40);
    Sampler a(nullptr, 40, params(1.0f, 0, 0.9f, 0.0f, 42), eog40), b(nullptr, 40, params(1.0f, 0, 0.9f, 0.0f, 42), eog40);
    bool same = true;
    for (int i = 0; i < 1000; i++) same = same && a.sample(l.data(), false, nullptr, 0) == b.sample(l.data(), false, nullptr, 0);
    report(same, "a seed gives the same draws", "");
    printf("%d failed\n", failures);
    return failures == 0 ? 0 : 1;
}

double ms_per_token(Sampler & s, const std::vector<float> & l, int iters) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; i++) s.sample(l.data(), false, nullptr, 0);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
}

int bench() {
    const int32_t V = 151936;  // Qwen2.5-VL's vocabulary
    std::mt19937 rng(1);
    // Two logit shapes: flat (a random-weight model) and peaked (a trained model: a few dozen
    // plausible tokens far above the rest).
    std::vector<float> flat(V), peaked(V);
    std::normal_distribution<float> nd(0, 2);
    for (int32_t t = 0; t < V; t++) flat[t] = nd(rng);
    for (int32_t t = 0; t < V; t++) peaked[t] = nd(rng) - 10.0f;
    for (int i = 0; i < 40; i++) peaked[(i * 7919) % V] = 8.0f - 0.3f * i;
    const EogTokens eog({151643, 151645}, V);
    struct Mode { const char * name; SamplingParams p; };
    const Mode modes[] = {
        {"greedy", params(0.0f, 0, 1.0f, 0.0f, 1)},
        {"temperature 1.0 (CapRL's README)", params(1.0f, 0, 1.0f, 0.0f, 1)},
        {"top_k 50, temperature 0.7", params(0.7f, 50, 1.0f, 0.0f, 1)},
        {"top_p 0.9, temperature 0.7", params(0.7f, 0, 0.9f, 0.0f, 1)},
    };
    printf("| mode | logits | llama.cpp chain ms/token | direct ms/token | speed-up |\n|---|---|---|---|---|\n");
    for (const Mode & m : modes) {
        for (int shape = 0; shape < 2; shape++) {
            const auto & l = shape == 0 ? flat : peaked;
            Sampler chain(nullptr, V, m.p, eog, Sampler::Path::Chain), direct(nullptr, V, m.p, eog);
            ms_per_token(chain, l, 3);
            ms_per_token(direct, l, 3);
            const double c = ms_per_token(chain, l, 40), d = ms_per_token(direct, l, 40);
            printf("| %s | %s | %.3f | %.3f | %.1fx |\n", m.name, shape == 0 ? "flat" : "peaked", c, d, c / d);
        }
    }
    // One engine step: 32 sequences, temperature 1.0, on 1..hw threads.
    const int rows = 32;
    std::vector<std::vector<float>> L(rows, peaked);
    std::vector<std::unique_ptr<Sampler>> ss;
    for (int r = 0; r < rows; r++) ss.push_back(std::make_unique<Sampler>(nullptr, V, params(1.0f, 0, 1.0f, 0.0f, r), eog));
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    printf("\n| threads | ms per step of %d rows (temperature 1.0, direct) |\n|---|---|\n", rows);
    for (unsigned th = 1; th <= hw; th *= 2) {
        const auto t0 = std::chrono::steady_clock::now();
        const int steps = 10;
        for (int s = 0; s < steps; s++) {
            std::vector<std::thread> pool;
            for (unsigned w = 0; w < th; w++) {
                pool.emplace_back([&, w] {
                    for (int r = (int) w; r < rows; r += (int) th) ss[r]->sample(L[r].data(), false, nullptr, 0);
                });
            }
            for (auto & t : pool) t.join();
        }
        printf("| %u | %.2f |\n", th, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / steps);
    }
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc > 1 && strcmp(argv[1], "bench") == 0) return bench();
    return check();
}
