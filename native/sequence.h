// One admitted request: its slot in the KV cache, prefill progress, sampler and output stream.
#pragma once

#include "llama.h"
#include "mtmd.h"
#include "sampler.h"
#include "text-stream.h"
#include "types.h"
#include "vision-worker.h"

#include <chrono>
#include <memory>
#include <vector>

namespace caprl {

// A piece of the prompt: text tokens, or an image chunk owned by Sequence::chunks.
struct PromptPart {
    std::vector<llama_token> tokens;
    const mtmd_input_chunk * media = nullptr;
    uint64_t vision_key = 0;  // the VisionWorker job encoding `media`, 0 = none pending
    Embeddings embd;          // its embeddings once encoded, decoded over one or more steps
    int32_t rows_done = 0;    // embedding rows already in the KV cache
    int32_t n_cells() const;
};

struct Sequence {
    Request req;           // a choice k > 0 carries only the id and sampling
    int32_t index = 0;     // choice index
    llama_seq_id seq_id = -1;
    std::vector<llama_seq_id> choice_seq_ids;  // slots held for choices 1..n-1 until the prefill ends

    SharedChunks chunks;  // keeps media chunks alive (shared with the vision worker)
    std::vector<PromptPart> parts;
    size_t part = 0;      // next part to prefill
    size_t part_off = 0;  // tokens of parts[part] already in the batch
    int32_t prompt_cells = 0;
    int32_t reserved_cells = 0;         // cells this sequence may still need: prompt (choice 0) + its output
    int32_t choice_reserved_cells = 0;  // output cells reserved for each choice not yet forked

    llama_pos n_past = 0;   // position of the next token (M-RoPE images advance it by less than their cells)
    int32_t n_cells = 0;    // KV cells this sequence wrote
    int32_t shared_cells = 0;  // prompt cells it shares with choice 0 (n > 1)
    llama_token next = -1;  // sampled token to decode in the next step
    int32_t n_generated = 0;
    int32_t batch_row = -1; // row of this step's logits, -1 if none

    // KV admission: a pinned request (n > 1) holds a worst-case reservation; an unpinned one
    // (n = 1) takes cells as it goes and may be preempted (its cells freed, its prompt and the
    // tokens generated so far prefilled again later), as vLLM's recompute preemption does.
    bool pinned = false;
    size_t orig_parts = 0;                 // parts of the original prompt (a resume part may follow)
    std::vector<llama_token> generated;    // every sampled token handed to decode, in order
    bool resume_pending = false;           // the prefill in progress re-creates generated tokens
    bool preempted = false;                // cells taken back; cleared when its prefill is done again

    // For Finish::timings (steady clock). Admission happens once: a preempted sequence stays here.
    std::chrono::steady_clock::time_point admitted{}, first_token{}, last_token{};
    double image_encode_seconds = 0;  // vision worker time on this sequence's images so far

    std::unique_ptr<Sampler> sampler;
    std::unique_ptr<TextStream> text;
    Event pending;          // output gathered this step
    bool finished = false;

    bool prefilling() const { return part < parts.size(); }
    // Prompt cells not yet in the cache.
    int32_t prefill_left() const {
        int32_t left = 0;
        for (size_t i = part; i < parts.size(); i++) left += parts[i].n_cells();
        if (part >= parts.size()) return 0;
        // Text advances by part_off, an image (decoded over several steps) by rows_done.
        return left - (parts[part].media ? parts[part].rows_done : (int32_t) part_off);
    }
};

}  // namespace caprl
