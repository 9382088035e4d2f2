// The engine: one model, one KV cache, one native thread that runs the scheduler loop.
// Requests join between steps; each step puts every running sequence's next token and
// as much prompt as fits into one llama_decode batch (continuous batching).
#pragma once

#include "chat.h"
#include "kv-plan.h"
#include "llama.h"
#include "parallel-for.h"
#include "prompt-prep.h"
#include "token-embeddings.h"
#include "mtmd.h"
#include "sequence.h"
#include "types.h"
#include "vision-worker.h"

#include <array>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace caprl {

struct EngineInfo {
    std::string chat_template;
    std::string media_marker;
    uint32_t n_ctx = 0;
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
    using EventSink = std::function<void(std::vector<Event> &&)>;

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
    std::string detokenize(const std::vector<llama_token> & tokens) const;
    std::string apply_chat_template(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const;

  private:
    void loop();
    void wake_from_worker();  // the vision worker or the prompt-prep thread has a result
    bool step();  // one scheduler step; false when it made no progress (nothing to do, or only waiting on images)
    void take_inbox();
    void admit();
    PreparedPrompt prepare(const std::string & prompt, std::vector<ImagePtr> && images) const;  // prep thread
    void prepare_ahead();                  // hands the next waiting requests to the prep thread
    void forget_prepared(int64_t id);      // a waiting request ended
    void encode_waiting();                 // prepared waiting requests' images to the vision worker
    // Waiting request `id`'s prepared prompt, taken from the prep thread into prepared_ on first
    // use; null while it is still being prepared.
    PreparedPrompt * prepared_prompt(int64_t id);
    // Decodes up to max_rows of a sequence's prompt as embedding rows, in one llama_decode: the
    // current image's rows, or with_text, every part's (text as token embeddings) once all its
    // images are encoded. Returns the rows decoded, or -1 while an image it needs is encoding.
    int32_t prefill_rows(Sequence & seq, int32_t max_rows, bool with_text);
    // Takes the current image's (or all: every remaining image's) embeddings from the vision
    // worker: 1 when all are here, -1 while one is encoding, 0 if one failed (seq finished).
    int32_t take_encoded_images(Sequence & seq, bool all);
    // Whether the prompt goes in as embedding rows (an image prompt, and the table is readable):
    // its text then shares the image's llama_decode instead of ubatches of its own.
    bool prompt_as_rows(const Sequence & seq) const;
    void submit_images(Sequence & seq);  // queued in vision_jobs_, handed over by submit_queued_images()
    void queue_images(std::vector<PromptPart> & parts, const SharedChunks & chunks, const std::vector<ImagePtr> & images);
    void submit_queued_images();
    int64_t cells_committed(bool with_prefill) const;  // reserved (pinned) + used (+ still to prefill) cells
    void make_room();                      // preempts the youngest unpinned sequences until this step fits
    void pack_decoding_streams();          // per-sequence KV: decoding sequences onto ids 0..d-1
    bool vacate_seq_id(llama_seq_id id, llama_seq_id above);  // moves a non-decoding holder of `id` above `above`
    void move_sequence(Sequence & seq, llama_seq_id to);      // to a free id, its KV stream copied
    void preempt(Sequence & seq);
    int64_t growth_watermark() const;
    bool may_start_resume(const Sequence & seq, int64_t free_cells) const;
    // With the model and the vision encoder both on the CPU (cpu_turns_): runs the vision worker's
    // next encoder pass on this thread, if one is queued; steps_waiting: decoding waits for it.
    bool run_vision_pass(bool steps_waiting);
    void sample_outputs(std::chrono::steady_clock::time_point decode_started);
    struct Draw {
        llama_token token = -1;
        bool suppress_eog = false;
        TokenLogprob logprob;
    };
    Draw draw(Sequence & seq, const float * logits) const;  // thread-safe across sequences
    void accept(Sequence & seq, Draw && d);         // engine thread: stop checks, text, events
    Sequence fork_choice(const Sequence & parent, int32_t index, llama_seq_id seq_id);
    // Ends every choice of a request that never got a sequence (cancelled while waiting, bad prompt).
    void end_unadmitted(const Request & req, const std::string & reason, int32_t prompt_tokens = 0, const std::string & error = "");
    void finish(Sequence & seq, const std::string & reason, const std::string & error = "");
    Timings timings_of(const Sequence & seq) const;
    void count_step_tokens(uint32_t tokens);  // one engine step's tokens into the step_tokens histogram
    void release_finished();
    llama_seq_id take_seq_id();  // the lowest free one (admit() checks there is one)
    void emit(std::vector<Event> && events);

    EngineOptions opts_;
    EventSink sink_;
    EngineInfo info_;

    llama_model * model_ = nullptr;
    llama_context * ctx_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
    mtmd_context * mtmd_ = nullptr;
    std::unique_ptr<QwenVisionEncoder> caprl_vision_;  // EngineOptions::vision_encoder "caprl"; outlives vision_
    bool cpu_turns_ = false;  // model and vision encoder both on the CPU: encoder passes run on the engine thread
    std::unique_ptr<VisionWorker> vision_;
    std::unique_ptr<ParallelFor> sampling_;
    uint64_t next_vision_key_ = 1;
    common_chat_templates_ptr templates_;
    std::unique_ptr<EogTokens> eog_;  // set once the vocabulary is loaded
    llama_batch batch_{};
    uint32_t max_model_len_ = 0;

    // Shared with the JS thread.
    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Request> submitted_;  // held until flush_submitted()
    std::deque<Request> inbox_;
    std::vector<int64_t> cancels_;
    bool stopping_ = false;
    bool worker_ready_ = false;  // an image was encoded or a prompt prepared since the engine thread last waited
    std::thread thread_;

    // Engine thread only.
    std::deque<Request> waiting_;
    std::unique_ptr<PromptPrep> prep_;
    std::unordered_set<int64_t> prep_sent_;                    // waiting requests handed to prep_
    std::unordered_map<int64_t, PreparedPrompt> prepared_;     // taken from prep_, not admitted yet
    std::list<Sequence> running_;
    // Free sequence ids (KV streams); the lowest is taken first, so with a stream per sequence the
    // running ones stay packed at the low ids (see step()).
    std::set<llama_seq_id> free_seq_ids_;
    std::vector<VisionWorker::Job> vision_jobs_;  // this step's images, for the vision worker
    std::unique_ptr<TokenEmbeddings> token_embd_;  // image prompts' text as rows (null: in token batches)
    std::vector<float> rows_buf_;                 // a prompt chunk's embedding rows, gathered
    int64_t reserved_cells_ = 0;
    std::vector<Event> out_;

    // Counters read by stats().
    std::atomic<uint64_t> steps_{0};
    std::atomic<uint32_t> last_batch_seqs_{0};
    std::atomic<uint32_t> max_batch_seqs_{0};
    std::atomic<uint64_t> decoded_seqs_total_{0};
    std::atomic<uint32_t> n_running_{0};
    std::atomic<uint32_t> n_waiting_{0};
    std::atomic<uint32_t> kv_used_{0};
    std::atomic<uint64_t> prompt_tokens_total_{0};
    std::atomic<uint64_t> generation_tokens_total_{0};
    std::atomic<uint64_t> preemptions_{0};
    std::atomic<uint64_t> stream_moves_{0};
    std::array<std::atomic<uint64_t>, 32> step_tokens_{};  // EngineStats::step_tokens
    std::atomic<uint64_t> step_tokens_sum_{0};
    std::atomic<uint64_t> busy_ns_{0}, model_ns_{0}, sample_ns_{0}, cpu_wait_ns_{0};  // EngineStats::*_seconds
};

}  // namespace caprl
