// Plain data crossing the JS/C++ boundary (mirrors src/engine/native-types.ts).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace caprl {

struct SamplingParams {
    float temperature = 1.0f;      // 0 = greedy
    float top_p = 1.0f;
    int32_t top_k = 0;             // <= 0 disabled
    float min_p = 0.0f;
    float repetition_penalty = 1.0f;
    float presence_penalty = 0.0f;
    float frequency_penalty = 0.0f;
    int64_t seed = -1;             // -1 = random
    int32_t max_tokens = -1;       // -1: the rest of the context (--max-model-len less the prompt)
    int32_t min_tokens = 0;
    bool ignore_eos = false;
    std::vector<std::string> stop;
    std::vector<int32_t> stop_token_ids;
    int32_t logprobs = -1;         // -1 none, 0 chosen token only, N top-N
};

struct Image {
    uint32_t width = 0;
    uint32_t height = 0;
    std::vector<unsigned char> rgb;  // width * height * 3
};

// A request's image, shared read-only by the stages that need its pixels (prompt prep, the
// vision worker), so that none copies them.
using ImagePtr = std::shared_ptr<const Image>;

// An image's embeddings ([rows][n_embd] f32), shared read-only by the image-embedding cache and
// the sequences decoding them, so that neither copies them (11 MB for a 1036x1036 image).
using Embeddings = std::shared_ptr<const std::vector<float>>;

struct Request {
    int64_t id = 0;
    int32_t n = 1;  // choices sampled from one shared prefill
    std::string prompt;
    std::vector<ImagePtr> images;
    SamplingParams sampling;
    std::chrono::steady_clock::time_point arrived{};  // set by Engine::submit (entry into the inbox)
};

struct TopLogprob {
    int32_t token;
    std::string text;
    float logprob;
};

struct TokenLogprob {
    int32_t token;
    std::string text;
    float logprob;
    std::vector<TopLogprob> top;
};

// One choice's time in the engine, seconds on the monotonic clock, split as vLLM splits a request
// (queue, prefill, decode). Absent for a request that never got a sequence.
struct Timings {
    double queued = 0;                    // inbox -> admitted into a sequence
    std::optional<double> prefill;        // admitted -> first token sampled (waiting on images included); none if no token
    std::optional<double> decode;         // first -> last token sampled
    std::optional<double> image_encode;   // vision worker time on the request's images (choice 0 of a request with images)
};

enum class FinishReason { kStop, kLength, kAbort, kError };
const char * finish_reason_name(FinishReason r);  // stop | length | abort | error

// Whose fault an error is, as llama-server types its task errors: the HTTP layer maps it to a
// status (client: 400, capacity: 503, internal: 500).
enum class ErrorKind { kNone, kClient, kCapacity, kInternal };
const char * error_kind_name(ErrorKind k);  // "" | client | capacity | internal

struct Finish {
    FinishReason reason = FinishReason::kStop;
    int32_t prompt_tokens = 0;
    int32_t completion_tokens = 0;
    std::string error;        // reason kError: what failed
    ErrorKind error_kind = ErrorKind::kNone;
    std::string error_param;  // client fault: the request field at fault ("prompt", "max_tokens", "n")
    std::string error_code;   // OpenAI's code, if any ("context_length_exceeded")
    std::optional<std::string> stopped_by_text;
    std::optional<int32_t> stopped_by_token;
    std::optional<Timings> timings;
};

// Sent once per request, on choice 0, when its prompt is prepared and fits: the prompt's KV cells
// (images included, counted once, by the engine) and the output length it will get.
struct PromptAccepted {
    int32_t prompt_tokens = 0;
    int32_t max_tokens = 0;
};

struct Event {
    int64_t id = 0;
    int32_t index = 0;  // choice index, 0..n-1
    std::optional<PromptAccepted> accepted;
    std::vector<int32_t> tokens;
    std::string text;
    std::vector<TokenLogprob> logprobs;
    bool has_logprobs = false;
    std::optional<Finish> finish;
};

// The fewest sequences max_seqs 0 gives (the old fixed default): a cache too small to give each
// of them a KV stream at max_model_len is shared by them, admitted and preempted against.
constexpr uint32_t kAutoMinSeqs = 16;

struct EngineOptions {
    std::string model;
    std::string mmproj;
    // The KV pool (cells shared by all sequences) is sized by exactly one of these three.
    uint32_t n_ctx = 0;             // cells
    uint64_t kv_cache_bytes = 0;    // as many cells as fit these bytes (vLLM --kv-cache-memory-bytes)
    double memory_fraction = 0;     // the engine's share of its device's memory (vLLM --gpu-memory-utilization)
    uint32_t max_model_len = 0;     // per-sequence limit in cells, 0 = n_ctx
    uint32_t max_seqs = 8;         // 0 = as many as the KV cache holds at max_model_len, 16..256
    uint32_t n_batch = 512;
    uint32_t n_ubatch = 0;          // llama.cpp's ubatch (rows per pass over the weights); 0 = min(n_batch, 512)
    int32_t n_threads = 0;
    int32_t n_vision_threads = 0;   // 0 = n_threads when model and vision share the CPU by turns, else a quarter, at least 1
    int32_t n_sampling_threads = 0; // 0 = the decode threads (at most 8) for large vocabularies, else 1
    int32_t n_gpu_layers = -1;
    std::string chat_template;
    std::string log_level = "warn";
    size_t image_cache_bytes = 256u << 20;  // image-embedding cache; 0 = off
    std::string vision_encoder = "llama.cpp";  // or "caprl": our batched Qwen2.5-VL encoder (native/qwen-vision-encoder.cpp)
};

// EngineStats' numbers, one line each (C++ type, field, JS name): the struct and the addon's
// marshalling (native/addon.cpp) are made from this list, so a statistic is added here, where the
// engine counts it (Engine::stats), and on the JS side (src/engine/native-types.ts, src/metrics/).
#define CAPRL_ENGINE_STATS(X)                                                                              \
    X(uint64_t, steps, "steps")                                                                            \
    X(uint32_t, last_batch_seqs, "lastBatchSeqs")                                                          \
    X(uint32_t, max_batch_seqs, "maxBatchSeqs")                                                            \
    X(uint64_t, decoded_seqs_total, "decodedSeqsTotal")                                                    \
    X(uint32_t, running, "running")                                                                        \
    X(uint32_t, waiting, "waiting")                                                                        \
    X(uint32_t, kv_used_cells, "kvUsedCells")                                                              \
    X(uint32_t, kv_total_cells, "kvTotalCells")                                                            \
    X(uint64_t, prompt_tokens_total, "promptTokensTotal")                                                  \
    X(uint64_t, generation_tokens_total, "generationTokensTotal")                                          \
    X(uint64_t, preemptions, "preemptions")                                                                \
    /* per-sequence KV: sequences moved to a lower id (stream copied) */                                   \
    X(uint64_t, stream_moves, "streamMoves")                                                               \
    X(uint64_t, image_cache_hits, "imageCacheHits")                                                        \
    X(uint64_t, image_cache_misses, "imageCacheMisses")                                                    \
    X(uint64_t, step_tokens_sum, "stepTokensSum")                                                          \
    /* engine-thread time in steps that had sequences running, and the parts of it in the model */         \
    /* (llama_decode of image rows and of the batch, until its logits are ready) and in the draws; */      \
    /* cpu wait: encoder passes run by the engine thread while steps waited (model and vision both */      \
    /* on the CPU); the rest is host work (scheduling, batch building, events) */                          \
    X(double, busy_seconds, "busySeconds")                                                                 \
    X(double, model_seconds, "modelSeconds")                                                               \
    X(double, sample_seconds, "sampleSeconds")                                                             \
    X(double, cpu_wait_seconds, "cpuWaitSeconds")

struct EngineStats {
#define CAPRL_STAT_FIELD(type, name, js) type name = 0;
    CAPRL_ENGINE_STATS(CAPRL_STAT_FIELD)
#undef CAPRL_STAT_FIELD
    // Tokens per engine step (prompt, decode and image-embedding rows decoded): step_tokens[k] counts
    // the steps with 2^(k-1) < tokens <= 2^k (k = 0: one token), so any power-of-two buckets are exact.
    std::array<uint64_t, 32> step_tokens{};
};

}  // namespace caprl
