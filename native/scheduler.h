// The scheduler: every decision of an engine step, and none of its computation. It owns the
// waiting requests and the running sequences, their sequence ids (KV streams) and the KV pool's
// accounting, and decides admission, preemption, the packing of decoding sequences onto the low
// ids, how the step's token budget is spent (chunked image prompts included) and when a request
// with n choices forks. schedule() returns the step as a plain value (StepPlan); the model runner
// executes it; update() applies what the runner reports. It calls no llama.cpp function: the
// prompt-prep thread and the vision worker are reached through SchedulerIo, so tests drive it
// with no model.
#pragma once

#include "prompt-prep.h"
#include "sequence.h"
#include "types.h"
#include "vision-worker.h"

#include <atomic>
#include <cstdint>
#include <deque>
#include <list>
#include <set>
#include <vector>

namespace caprl {

struct SchedulerConfig {
    uint32_t max_seqs = 16;        // sequence ids 0..max_seqs-1
    int64_t kv_cells = 0;          // the KV pool
    uint32_t max_model_len = 0;    // per sequence, prompt + output
    int32_t n_batch = 512;         // the step's token budget
    int32_t n_ubatch = 512;        // rows per pass: a prompt over the budget advances in whole ubatches
    bool per_sequence_kv = false;  // a KV stream per sequence (decoding sequences kept on ids 0..d-1)
    bool image_prompt_rows = false;  // an image prompt goes in as one run of embedding rows, its text too
};

// The threads around the scheduler (prompt prep, vision worker); tests give fakes.
class SchedulerIo {
  public:
    virtual ~SchedulerIo() = default;
    virtual void prepare(std::vector<PromptJob> && jobs) = 0;
    // A prepared prompt, once ready (moved out); false while it is being prepared.
    virtual bool take_prepared(int64_t id, PreparedPrompt & out) = 0;
    virtual void drop_prepared(int64_t id) = 0;
    virtual void encode(std::vector<VisionWorker::Job> && jobs) = 0;
    // An encoded image, once ready: its embeddings (null if encoding failed) and encode seconds.
    virtual bool take_encoded(uint64_t key, Embeddings & embd, double & seconds) = 0;
    virtual void drop_encoded(uint64_t key) = 0;
};

// Counts the scheduler keeps for EngineStats (read from other threads).
struct SchedulerCounters {
    std::atomic<uint64_t> prompt_tokens_total{0};
    std::atomic<uint64_t> preemptions{0};
    std::atomic<uint64_t> stream_moves{0};
    std::atomic<uint32_t> running{0};
    std::atomic<uint32_t> waiting{0};
    std::atomic<uint32_t> kv_used_cells{0};
};

// A KV cache operation, done in plan order before the step's decodes.
struct KvOp {
    enum Kind { kFree, kMove } kind;
    llama_seq_id seq;       // kFree: the stream emptied; kMove: the stream copied from
    llama_seq_id to = -1;   // kMove: the (empty) stream copied to; `seq` is emptied after
};

// One llama_decode of embedding rows: an image prompt's (text as token-embedding rows) or an
// image's. The rows run from `from` to `to` of the sequence's prompt.
struct RowsDecode {
    Sequence * seq;
    PromptCursor from, to;
    int32_t rows;
    bool with_text;
    bool whole;  // a non-causal image: attends within itself both ways
};

// A sequence's rows in the step's token batch: prompt tokens from `from` to `to`, or (decode) its
// next token at from.n_past. logits: its last row gives a draw.
struct BatchRows {
    Sequence * seq;
    PromptCursor from, to;
    bool decode;
    bool logits;
};

struct StepPlan {
    std::vector<KvOp> kv;
    std::vector<RowsDecode> rows;  // in order, each a llama_decode of its own
    std::vector<BatchRows> batch;  // one llama_decode, rows in sequence-id order
    // After the batch: choices whose prompt prefill ends in it (the prompt's stream copied to
    // theirs); each draws from its parent's logits row. Owned here until update() starts them.
    std::list<Sequence> forks;
    std::vector<Sequence *> fork_parents;  // forks' parents, in the same order
    uint32_t decoding = 0;      // sequences that decode a token this step
    bool progress = false;      // something changed besides the decodes (admissions, finishes, images)
    bool idle() const { return rows.empty() && batch.empty(); }
};

// What the model runner reports of a plan.
struct StepResult {
    std::vector<int32_t> rows_rc;  // per plan.rows: llama_decode's result (1: no KV room), or kRowsUnreadable
    int32_t batch_rc = 0;          // llama_decode's result for plan.batch
    struct Draw {
        llama_token token = -1;
        bool suppress_eog = false;
        TokenLogprob logprob;
    };
    // The draws (batch success only): each batch row with logits, in plan order, then each fork.
    std::vector<std::pair<Sequence *, Draw>> draws;
};
// rows_rc of a prompt whose text rows could not be read from the token-embedding table.
constexpr int32_t kRowsUnreadable = -100;

// A request that ended without a sequence (cancelled while waiting, refused).
struct Unadmitted {
    int64_t id;
    int32_t n;
    int32_t prompt_tokens;
    Ending ending;
    std::chrono::steady_clock::time_point arrived;
};

class Scheduler {
  public:
    Scheduler(SchedulerConfig cfg, SchedulerIo & io, SchedulerCounters & counters);

    const SchedulerConfig & config() const { return cfg_; }

    void add(Request && req);
    // Ends a request wherever it is (abort).
    void cancel(int64_t id);
    // Ends everything live (abort): at shutdown.
    void cancel_all();

    StepPlan schedule();
    void update(StepPlan & plan, const StepResult & result);
    // Drops finished sequences once their events are out: their ids back, their cells freed
    // before the next step's decodes (the next plan's first KV ops).
    void release_finished();

    std::list<Sequence> & running() { return running_; }
    // Requests ended without a sequence since the last call, and accepted prompts to announce.
    std::vector<Unadmitted> take_unadmitted();
    std::vector<std::pair<int64_t, PromptAccepted>> take_accepted();
    bool has_waiting() const { return !waiting_.empty(); }

  private:
    enum class Prep { kQueued, kPreparing, kReady };
    struct Waiting {
        Request req;
        Prep prep = Prep::kQueued;
        PreparedPrompt prompt;     // kReady
        bool images_queued = false;  // handed to the vision worker while it waits
    };

    void prepare_ahead();
    bool take_prepared(Waiting & w);  // kPreparing -> kReady once the prep thread is done
    void accept(Waiting & w);         // the prompt's checks against the context (once)
    void end_waiting(std::deque<Waiting>::iterator it, Ending e);
    void encode_waiting();
    void admit(StepPlan & plan);
    void queue_images(std::vector<PromptPart> & parts, const SharedChunks & chunks, const std::vector<ImagePtr> & images);
    void submit_queued_images();
    int64_t cells_committed(bool with_prefill) const;
    int64_t growth_watermark() const;
    void make_room(StepPlan & plan);
    void preempt(Sequence & seq, std::vector<KvOp> & kv);
    bool may_start_resume(const Sequence & seq, int64_t free_cells) const;
    void pack_decoding_streams(StepPlan & plan);
    bool vacate_seq_id(llama_seq_id id, llama_seq_id above, StepPlan & plan);
    void move_sequence(Sequence & seq, llama_seq_id to, StepPlan & plan);
    bool prompt_as_rows(const Sequence & seq) const;
    // Takes the current image's (or all: every remaining image's) embeddings from the vision
    // worker: 1 when all are here, -1 while one is encoding, 0 if one failed (seq ended).
    int32_t take_encoded_images(Sequence & seq, bool all);
    void plan_prompts(StepPlan & plan, int32_t & budget, int64_t & free_cells);
    // Choice `index` of a parent whose prompt ends at `end` in this step's batch.
    Sequence fork_choice(const Sequence & parent, int32_t index, llama_seq_id seq_id, const PromptCursor & end) const;
    Sequence * youngest_unpinned_with_cells();
    void no_kv_room(Sequence & failed, std::vector<KvOp> & kv);
    llama_seq_id take_seq_id();

    SchedulerConfig cfg_;
    SchedulerIo & io_;
    SchedulerCounters & counters_;
    std::deque<Waiting> waiting_;
    std::list<Sequence> running_;
    // Free sequence ids (KV streams); the lowest is taken first, so with a stream per sequence the
    // running ones stay packed at the low ids.
    std::set<llama_seq_id> free_seq_ids_;
    std::vector<VisionWorker::Job> vision_jobs_;  // this step's images, for the vision worker
    uint64_t next_vision_key_ = 1;
    int64_t reserved_cells_ = 0;
    std::vector<Unadmitted> unadmitted_;
    std::vector<std::pair<int64_t, PromptAccepted>> accepted_;
    std::vector<KvOp> deferred_kv_;  // frees decided outside schedule() (preemption on no KV room)
};

}  // namespace caprl
