// The model runner: carries out a StepPlan on the model. KV operations, each run of embedding
// rows as a llama_decode of its own (an image prompt's text read from the token-embedding table,
// its images' rows at their M-RoPE positions), the token batch as one llama_decode, the choices'
// KV copies, then a draw for every row with logits (on the sampling threads). It decides nothing.
#pragma once

#include "llama.h"
#include "mtmd.h"
#include "parallel-for.h"
#include "sampler.h"
#include "scheduler.h"
#include "token-embeddings.h"

#include <atomic>
#include <chrono>
#include <memory>
#include <vector>

namespace caprl {

// The runner's time counters, read by EngineStats.
struct RunnerCounters {
    std::atomic<uint64_t> model_ns{0};   // llama_decode until the logits are ready
    std::atomic<uint64_t> sample_ns{0};  // the draws
};

class ModelRunner {
  public:
    // token_embd: null keeps image prompts' text in token batches (the scheduler plans so).
    ModelRunner(llama_context * ctx, mtmd_context * mtmd, std::unique_ptr<TokenEmbeddings> token_embd, const llama_vocab * vocab,
                int32_t n_vocab, const EogTokens & eog, int32_t sampling_threads, RunnerCounters & counters);
    ~ModelRunner();
    ModelRunner(const ModelRunner &) = delete;
    ModelRunner & operator=(const ModelRunner &) = delete;

    StepResult execute(StepPlan & plan);
    void apply(const std::vector<KvOp> & ops);

  private:
    int32_t decode_rows(const RowsDecode & r);

    llama_context * ctx_;
    mtmd_context * mtmd_;
    std::unique_ptr<TokenEmbeddings> token_embd_;
    const llama_vocab * vocab_;
    int32_t n_vocab_;
    const EogTokens & eog_;
    int32_t n_embd_;
    ParallelFor sampling_;
    RunnerCounters & counters_;
    llama_batch batch_{};
    std::vector<float> rows_buf_;  // a prompt chunk's embedding rows, gathered
};

}  // namespace caprl
