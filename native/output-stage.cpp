#include "output-stage.h"

#include <algorithm>

namespace caprl {

namespace {

double seconds_between(std::chrono::steady_clock::time_point from, std::chrono::steady_clock::time_point to) {
    return std::chrono::duration<double>(to - from).count();
}

Finish finish_of(const Ending & e, int32_t prompt_tokens, int32_t completion_tokens) {
    Finish f;
    f.reason = e.reason;
    f.prompt_tokens = prompt_tokens;
    f.completion_tokens = completion_tokens;
    f.error = e.message;
    f.error_kind = e.kind;
    f.error_param = e.param;
    f.error_code = e.code;
    f.stopped_by_token = e.stopped_by_token;
    return f;
}

}  // namespace

OutputStage::OutputStage(const llama_vocab * vocab, uint32_t max_model_len, EventSink sink, std::atomic<uint64_t> & generation_tokens_total)
    : vocab_(vocab), max_model_len_(max_model_len), sink_(std::move(sink)), generation_tokens_total_(generation_tokens_total) {}

void OutputStage::accept(StepResult & result) {
    for (auto & [seq, d] : result.draws) accept(*seq, d);
}

void OutputStage::accept(Sequence & seq, StepResult::Draw & d) {
    if (seq.finished()) return;
    const SamplingParams & sp = seq.req.sampling;
    const llama_token tok = d.token;
    seq.n_generated++;
    generation_tokens_total_++;
    seq.last_token = std::chrono::steady_clock::now();
    if (seq.n_generated == 1) seq.first_token = seq.last_token;
    if (!seq.text) seq.text = std::make_unique<TextStream>(sp.stop);

    const bool is_stop_id = std::find(sp.stop_token_ids.begin(), sp.stop_token_ids.end(), tok) != sp.stop_token_ids.end();
    if (is_stop_id && seq.n_generated > sp.min_tokens) {
        Ending e;
        e.stopped_by_token = tok;
        seq.end(std::move(e));
        return;
    }
    if (!d.suppress_eog && llama_vocab_is_eog(vocab_, tok)) {
        seq.end(Ending{});
        return;
    }
    seq.pending.tokens.push_back(tok);
    if (sp.logprobs >= 0) {
        seq.pending.logprobs.push_back(std::move(d.logprob));
        seq.pending.has_logprobs = true;
    }
    seq.pending.text += seq.text->push(token_piece(vocab_, tok));
    if (seq.text->matched()) {
        seq.end(Ending{});
        return;
    }
    if (seq.n_generated >= sp.max_tokens || (uint32_t) seq.stream_cells() + 1 >= max_model_len_) {
        seq.end(Ending{FinishReason::kLength});
        return;
    }
    seq.next = tok;
    seq.generated.push_back(tok);
}

void OutputStage::finish_event(Sequence & seq) {
    const Timings timings = timings_of(seq);
    // Choices never forked (the request ended during its prefill) end the same way.
    for (size_t k = 0; k < seq.choice_seq_ids.size(); k++) {
        Event ev;
        ev.id = seq.req.id;
        ev.index = (int32_t) k + 1;
        ev.finish = finish_of(seq.ending, seq.prompt_cells, 0);
        ev.finish->stopped_by_token.reset();
        ev.finish->timings = Timings{timings.queued};
        out_.push_back(std::move(ev));
    }
    seq.pending.text += seq.text ? seq.text->flush() : std::string();
    Finish f = finish_of(seq.ending, seq.prompt_cells, seq.n_generated);
    if (seq.text && seq.text->matched()) f.stopped_by_text = *seq.text->matched();
    f.timings = timings;
    seq.pending.finish = f;
}

Timings OutputStage::timings_of(const Sequence & seq) const {
    // As vLLM: queued ends at the first admission (a preempted sequence is not queued again; the
    // time it waits to resume counts in its prefill or decode); prefill and decode exist once a
    // token was sampled, decode ending at the last one (an abort's finish comes later).
    Timings t;
    t.queued = seconds_between(seq.req.arrived, seq.admitted);
    if (seq.n_generated > 0) {
        t.prefill = seconds_between(seq.admitted, seq.first_token);
        t.decode = seconds_between(seq.first_token, seq.last_token);
    }
    // The images belong to the request, reported once, on choice 0 (forks carry no prompt parts).
    if (seq.has_images()) t.image_encode = seq.image_encode_seconds;
    return t;
}

void OutputStage::collect(Scheduler & scheduler) {
    for (auto & [id, accepted] : scheduler.take_accepted()) {
        Event ev;
        ev.id = id;
        ev.accepted = accepted;
        out_.push_back(std::move(ev));
    }
    for (const Unadmitted & u : scheduler.take_unadmitted()) {
        for (int32_t k = 0; k < u.n; k++) {
            Event ev;
            ev.id = u.id;
            ev.index = k;
            ev.finish = finish_of(u.ending, u.prompt_tokens, 0);
            out_.push_back(std::move(ev));
        }
    }
    for (auto & seq : scheduler.running()) {
        if (seq.finished()) finish_event(seq);
        if (!seq.pending.tokens.empty() || !seq.pending.text.empty() || seq.pending.finish) {
            out_.push_back(std::move(seq.pending));
            seq.pending = Event{};
            seq.pending.id = seq.req.id;
            seq.pending.index = seq.index;
        }
    }
    scheduler.release_finished();
}

bool OutputStage::emit() {
    if (out_.empty()) return false;
    sink_(std::move(out_));
    out_.clear();
    return true;
}

}  // namespace caprl
