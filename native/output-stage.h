// The output stage: what a step's draws mean to the client. Stop tokens, end of generation, stop
// strings (with UTF-8 hold-back, native/text-stream.h), max_tokens and the context's end decide a
// sequence's finish; tokens, text and log-probabilities gather into one event per sequence, and
// every event of the step goes to JS in one call.
#pragma once

#include "llama.h"
#include "scheduler.h"
#include "types.h"

#include <atomic>
#include <functional>
#include <vector>

namespace caprl {

class OutputStage {
  public:
    using EventSink = std::function<void(std::vector<Event> &&)>;

    OutputStage(const llama_vocab * vocab, uint32_t max_model_len, EventSink sink, std::atomic<uint64_t> & generation_tokens_total);

    // The step's draws, in the scheduler's order: each sequence's token, or its end.
    void accept(StepResult & result);
    // Events for what the scheduler reports (accepted prompts, requests ended unadmitted) and for
    // every sequence with output or an end; then the scheduler drops the finished ones.
    void collect(Scheduler & scheduler);
    // Hands the gathered events to JS; false when there were none.
    bool emit();

  private:
    void accept(Sequence & seq, StepResult::Draw & d);
    void finish_event(Sequence & seq);
    Timings timings_of(const Sequence & seq) const;

    const llama_vocab * vocab_;
    uint32_t max_model_len_;
    EventSink sink_;
    std::atomic<uint64_t> & generation_tokens_total_;
    std::vector<Event> out_;
};

}  // namespace caprl
