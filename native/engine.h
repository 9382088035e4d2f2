// The engine: one model, one KV cache, one native thread that runs the step loop. Requests join
// between steps; each step is the scheduler's plan (native/scheduler.h), carried out by the model
// runner (native/model-runner.h), its draws turned into events by the output stage
// (native/output-stage.h): continuous batching.
#pragma once

#include "chat.h"
#include "kv-plan.h"
#include "llama.h"
#include "model-runner.h"
#include "mtmd.h"
#include "output-stage.h"
#include "prompt-prep.h"
#include "scheduler.h"
#include "types.h"
#include "vision-worker.h"

#include <array>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace caprl {

struct EngineInfo {
    std::string chat_template;
    std::string media_marker;
    uint32_t n_ctx = 0;
    uint32_t max_model_len = 0;  // per sequence, prompt + output
    int32_t n_ctx_train = 0;
    int32_t n_vocab = 0;
    bool has_vision = false;
    bool image_prompt_rows = false;  // image prompts go in as one run of embedding rows (token table readable)
    std::vector<std::string> devices;
    uint32_t max_seqs = 0;
    int32_t n_layers = 0;          // repeating layers + output layer, as llama.cpp counts for offload
    int32_t n_gpu_layers = 0;      // of those, on a GPU
    // CPU threads of the model (decode) and of the vision encoder, and whether the two take turns
    // with the CPU (both on it: the engine thread runs the encoder passes) rather than compute side by side.
    struct Threads {
        uint32_t model = 0;
        uint32_t vision = 0;
        bool cpu_turns = false;
    } threads;
    KvCacheReport kv_cache;
    // Our vision encoder (EngineOptions vision_encoder "caprl"); kind empty with llama.cpp's clip.
    struct VisionEncoderReport {
        std::string kind;
        int64_t max_patches = 0;  // per graph: what its compute buffers are sized for
        std::vector<QwenVisionEncoder::DeviceBytes> memory;  // at start-up
    } vision_encoder;
};

struct ChatMessage {
    std::string role;
    std::string content;
};

class Engine {
  public:
    using EventSink = OutputStage::EventSink;

    // Loads model (and mmproj) and starts the engine thread; throws std::runtime_error on failure.
    Engine(const EngineOptions & opts, EventSink sink);
    ~Engine();

    // Holds a request until flush_submitted(): the requests of one JS turn reach the engine
    // thread together, so a burst that finds the engine idle starts in one step.
    void submit(Request && req);
    void flush_submitted();
    void cancel(int64_t id);
    // Cancels everything live, stops the thread and joins it. Idempotent.
    void stop();

    const EngineInfo & info() const { return info_; }
    EngineStats stats() const;
    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    // A templated prompt as the engine will take it, images by their size only: its parts (text
    // tokens, or an image's KV cells), tokenized as the prompt-prep thread does; error: why not.
    PreparedPrompt tokenize_prompt(const std::string & prompt, std::vector<ImagePtr> && images, bool add_special) const;
    std::string detokenize(const std::vector<llama_token> & tokens) const;
    std::string apply_chat_template(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const;

  private:
    class ThreadsIo;  // SchedulerIo over the prompt-prep thread and the vision worker

    void load();  // model, vision encoder, KV cache, context (the constructor's first half)
    void loop();
    void wake_from_worker();  // the vision worker or the prompt-prep thread has a result
    struct StepOutcome {
        bool progress;  // anything happened (decodes, events, ends); false: nothing to do, or waiting on images
        bool decoded;   // sequences were decoded: an encoder pass after it makes them wait
    };
    StepOutcome step();
    void take_inbox();
    // With the model and the vision encoder both on the CPU (cpu_turns_): runs the vision worker's
    // next encoder pass on this thread, if one is queued; steps_waiting: decoding waits for it.
    bool run_vision_pass(bool steps_waiting);
    void count_step(const StepPlan & plan, const StepResult & result);

    EngineOptions opts_;
    EngineInfo info_;

    llama_model * model_ = nullptr;
    llama_context * ctx_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
    mtmd_context * mtmd_ = nullptr;
    std::unique_ptr<QwenVisionEncoder> caprl_vision_;  // EngineOptions::vision_encoder "caprl"; outlives vision_
    bool cpu_turns_ = false;  // model and vision encoder both on the CPU: encoder passes run on the engine thread
    uint32_t threads_ = 0, vision_threads_ = 0;
    common_chat_templates_ptr templates_;
    std::unique_ptr<EogTokens> eog_;  // set once the vocabulary is loaded
    PromptPrepContext prep_ctx_;

    // Shared with the JS thread.
    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Request> submitted_;  // held until flush_submitted()
    std::deque<Request> inbox_;
    std::vector<int64_t> cancels_;
    bool stopping_ = false;
    bool worker_ready_ = false;  // an image was encoded or a prompt prepared since the engine thread last waited
    std::thread thread_;

    // Counters read by stats().
    SchedulerCounters sched_counters_;
    RunnerCounters runner_counters_;
    std::atomic<uint64_t> steps_{0};
    std::atomic<uint32_t> last_batch_seqs_{0};
    std::atomic<uint32_t> max_batch_seqs_{0};
    std::atomic<uint64_t> decoded_seqs_total_{0};
    std::atomic<uint64_t> generation_tokens_total_{0};
    std::array<std::atomic<uint64_t>, 32> step_tokens_{};  // EngineStats::step_tokens
    std::atomic<uint64_t> step_tokens_sum_{0};
    std::atomic<uint64_t> busy_ns_{0}, cpu_wait_ns_{0};  // EngineStats::*_seconds

    // Engine thread only (the threads first: the scheduler's io refers to them).
    std::unique_ptr<PromptPrep> prep_;
    std::unique_ptr<VisionWorker> vision_;
    std::unique_ptr<ThreadsIo> io_;
    std::unique_ptr<Scheduler> scheduler_;
    std::unique_ptr<ModelRunner> runner_;
    std::unique_ptr<OutputStage> output_;
};

}  // namespace caprl
