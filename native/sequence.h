// One admitted request (or one of its n choices): its state, its place in the KV cache, how much
// of its prompt is in, and what it generated. The scheduler, the model runner and the output stage
// each keep their own fields of it up to date; its state changes only through set_state().
#pragma once

#include "llama.h"
#include "mtmd.h"
#include "sampler.h"
#include "text-stream.h"
#include "types.h"
#include "vision-worker.h"  // SharedChunks

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace caprl {

// A piece of the prompt: text tokens, or an image chunk owned by the prompt's chunks. Sizes are
// read from mtmd once, when the prompt is prepared, so that the scheduler never calls into mtmd.
struct PromptPart {
    std::vector<llama_token> tokens;
    const mtmd_input_chunk * media = nullptr;
    int32_t media_cells = 0;   // an image's KV cells (its rows)
    int32_t media_pos = 0;     // positions it advances (M-RoPE: max(rows, cols), not its cells)
    bool non_causal = false;   // attends within itself both ways: decoded in one piece
    uint64_t vision_key = 0;   // the VisionWorker job encoding `media`, 0 = none pending
    Embeddings embd;           // its embeddings once encoded, decoded over one or more steps
    int32_t n_cells() const { return media ? media_cells : (int32_t) tokens.size(); }
};

// Where a sequence's prompt stands: the next part, how much of it is in the cache (tokens of a
// text part, rows of an image), the next position and the cells written so far.
struct PromptCursor {
    size_t part = 0;
    int32_t done = 0;
    llama_pos n_past = 0;
    int32_t cells = 0;
    bool operator==(const PromptCursor & o) const {
        return part == o.part && done == o.done && n_past == o.n_past && cells == o.cells;
    }
};

// `at` moved n cells on through the parts: a text part advances the position by its tokens, an
// image by its positions once all its rows are in.
PromptCursor advance(const std::vector<PromptPart> & parts, PromptCursor at, int32_t n);
// Prompt cells from `at` to the end of the parts.
int32_t cells_left(const std::vector<PromptPart> & parts, const PromptCursor & at);

enum class SeqState {
    kPrefilling,  // admitted: its prompt goes into the cache
    kDecoding,    // generates one token per step
    kPreempted,   // its cells taken back: prefills its prompt (and its output so far) again
    kFinished,    // ended: events out, then its cells and ids are released
};
const char * seq_state_name(SeqState s);

// Why a sequence or a request ended, and for an error whose fault it was.
struct Ending {
    FinishReason reason = FinishReason::kStop;
    ErrorKind kind = ErrorKind::kNone;
    std::string message;
    std::string param;  // for a client fault: the request field at fault ("prompt", "max_tokens", "n")
    std::string code;   // OpenAI's error code, if any ("context_length_exceeded")
    std::optional<int32_t> stopped_by_token;
};

struct Sequence {
    Request req;           // a choice k > 0 carries only the id and sampling
    int32_t index = 0;     // choice index
    llama_seq_id seq_id = -1;
    std::vector<llama_seq_id> choice_seq_ids;  // slots held for choices 1..n-1 until the prefill ends

    SharedChunks chunks;  // keeps media chunks alive (shared with the vision worker)
    std::vector<PromptPart> parts;
    size_t orig_parts = 0;  // parts of the original prompt (a resume part may follow)
    PromptCursor at;        // prompt progress; after the prompt, at.n_past / at.cells keep counting
    int32_t prompt_cells = 0;
    int32_t reserved_cells = 0;         // cells this sequence may still need: prompt (choice 0) + its output
    int32_t choice_reserved_cells = 0;  // output cells reserved for each choice not yet forked
    int32_t shared_cells = 0;           // prompt cells it shares with choice 0 (n > 1)

    // KV admission: a pinned request (n > 1) holds a worst-case reservation; an unpinned one
    // (n = 1) takes cells as it goes and may be preempted (its cells freed, its prompt and the
    // tokens generated so far prefilled again later), as vLLM's recompute preemption does.
    bool pinned = false;
    std::vector<llama_token> generated;  // every sampled token handed to decode, in order
    llama_token next = -1;               // sampled token to decode in the next step
    int32_t n_generated = 0;

    // For Finish::timings (steady clock). Admission happens once: a preempted sequence stays here.
    std::chrono::steady_clock::time_point admitted{}, first_token{}, last_token{};
    double image_encode_seconds = 0;  // vision worker time on this sequence's images so far

    std::unique_ptr<Sampler> sampler;  // the model runner's, made at the first draw
    std::unique_ptr<TextStream> text;  // the output stage's, made at the first token
    Event pending;                     // output gathered this step
    Ending ending;                     // kFinished: why

    SeqState state() const { return state_; }
    // Moves to `to`; a transition outside the state machine is a bug (aborts).
    void set_state(SeqState to);
    // Ends the sequence (any state but kFinished; a second end is ignored).
    void end(Ending e);

    bool finished() const { return state_ == SeqState::kFinished; }
    bool prefilling() const { return state_ == SeqState::kPrefilling || state_ == SeqState::kPreempted; }
    bool decoding() const { return state_ == SeqState::kDecoding; }
    // Prompt cells not yet in the cache.
    int32_t prefill_left() const { return cells_left(parts, at); }
    // KV cells its stream holds (a forked choice holds the prompt's too).
    int32_t stream_cells() const { return shared_cells + at.cells; }
    bool has_images() const;

  private:
    SeqState state_ = SeqState::kPrefilling;
};

}  // namespace caprl
