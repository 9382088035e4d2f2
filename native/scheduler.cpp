#include "scheduler.h"

#include <algorithm>

namespace caprl {

namespace {

Ending client_fault(std::string message, std::string param, std::string code = "") {
    return Ending{FinishReason::kError, ErrorKind::kClient, std::move(message), std::move(param), std::move(code), std::nullopt};
}

Ending aborted() { return Ending{FinishReason::kAbort}; }

}  // namespace

Scheduler::Scheduler(SchedulerConfig cfg, SchedulerIo & io, SchedulerCounters & counters) : cfg_(cfg), io_(io), counters_(counters) {
    for (int32_t i = 0; i < (int32_t) cfg_.max_seqs; i++) free_seq_ids_.insert(i);
}

void Scheduler::add(Request && req) {
    if (req.n < 1 || (uint32_t) req.n > cfg_.max_seqs) {
        unadmitted_.push_back({req.id, std::max(req.n, 1), 0,
                               client_fault("n must be between 1 and " + std::to_string(cfg_.max_seqs) +
                                                " (the number of sequences, --max-num-seqs)",
                                            "n"),
                               req.arrived});
        return;
    }
    Waiting w;
    w.req = std::move(req);
    waiting_.push_back(std::move(w));
    counters_.waiting = (uint32_t) waiting_.size();
}

void Scheduler::cancel(int64_t id) {
    for (auto & seq : running_) {
        if (!seq.finished() && seq.req.id == id) seq.end(aborted());
    }
    for (auto it = waiting_.begin(); it != waiting_.end();) {
        if (it->req.id == id) {
            end_waiting(it, aborted());
            it = waiting_.erase(it);
        } else {
            ++it;
        }
    }
    counters_.waiting = (uint32_t) waiting_.size();
}

void Scheduler::cancel_all() {
    for (auto & seq : running_) seq.end(aborted());
    for (auto it = waiting_.begin(); it != waiting_.end(); ++it) end_waiting(it, aborted());
    waiting_.clear();
    counters_.waiting = 0;
}

void Scheduler::end_waiting(std::deque<Waiting>::iterator it, Ending e) {
    Waiting & w = *it;
    if (w.prep == Prep::kPreparing) io_.drop_prepared(w.req.id);
    for (const auto & part : w.prompt.parts) {
        if (part.vision_key) io_.drop_encoded(part.vision_key);
    }
    unadmitted_.push_back({w.req.id, w.req.n, w.prompt.prompt_cells, std::move(e), w.req.arrived});
}

std::vector<Unadmitted> Scheduler::take_unadmitted() {
    std::vector<Unadmitted> out;
    out.swap(unadmitted_);
    return out;
}

std::vector<std::pair<int64_t, PromptAccepted>> Scheduler::take_accepted() {
    std::vector<std::pair<int64_t, PromptAccepted>> out;
    out.swap(accepted_);
    return out;
}

// ---- waiting requests: prepared ahead, checked once, their images encoded ahead ----

void Scheduler::prepare_ahead() {
    // The next requests in line (as many as could be admitted at once) are prepared ahead; the
    // rest wait unprepared, so prepared images held in memory stay bounded. They are handed over
    // in one call, so the prep thread reports them ready together.
    std::vector<PromptJob> jobs;
    size_t k = 0;
    for (auto & w : waiting_) {
        if (k++ >= cfg_.max_seqs) break;
        if (w.prep != Prep::kQueued) continue;
        w.prep = Prep::kPreparing;
        jobs.push_back(PromptJob{(uint64_t) w.req.id, w.req.prompt, std::move(w.req.images)});
    }
    if (!jobs.empty()) io_.prepare(std::move(jobs));
}

bool Scheduler::take_prepared(Waiting & w) {
    if (w.prep == Prep::kReady) return true;
    if (w.prep != Prep::kPreparing || !io_.take_prepared(w.req.id, w.prompt)) return false;
    w.prep = Prep::kReady;
    accept(w);
    return true;
}

// The context check, once per request, where the prompt's cells (images included) are known: as
// vLLM's, the prompt must leave room for a token and max_tokens must fit beside it; without
// max_tokens the output may take the rest of the context.
void Scheduler::accept(Waiting & w) {
    PreparedPrompt & p = w.prompt;
    if (p.failed()) return;
    SamplingParams & sp = w.req.sampling;
    const int64_t cells = p.prompt_cells;
    const int64_t limit = cfg_.max_model_len;
    const std::string head = "This model's maximum context length is " + std::to_string(limit) + " tokens. However, you requested ";
    if (cells >= limit) {
        p.error = client_fault(head + std::to_string(cells) + " tokens in the messages, Please reduce the length of the messages.", "prompt",
                               "context_length_exceeded");
        return;
    }
    if (sp.max_tokens < 0) {
        sp.max_tokens = (int32_t) (limit - cells);
    } else if (cells + sp.max_tokens > limit) {
        p.error = client_fault(head + std::to_string(cells + sp.max_tokens) + " tokens (" + std::to_string(cells) + " in the messages, " +
                                   std::to_string(sp.max_tokens) + " in the completion). Please reduce the length of the messages or completion.",
                               "max_tokens", "context_length_exceeded");
        return;
    }
    const int32_t n = w.req.n;
    const int64_t out_cells = std::max(sp.max_tokens, 1);
    if (n > 1 && cells + n * out_cells > cfg_.kv_cells) {
        // The n choices at max_tokens would not fit the pool even alone. Each stops ("length")
        // where its share of the pool ends; running the pool out mid-step instead would fail
        // every sequence of that step, other requests' too.
        const int64_t share = (cfg_.kv_cells - cells) / n;
        if (share < 1) {
            p.error = client_fault(std::to_string(n) + " choices of this " + std::to_string(cells) + "-token prompt do not fit the KV cache (" +
                                       std::to_string(cfg_.kv_cells) + " tokens): lower n",
                                   "n");
            return;
        }
        sp.max_tokens = (int32_t) share;
    }
    accepted_.push_back({w.req.id, PromptAccepted{(int32_t) cells, sp.max_tokens}});
}

void Scheduler::encode_waiting() {
    // Requests waiting for a sequence slot or KV room (the prepared ones, at most --max-num-seqs
    // ahead) have their images encoded meanwhile, beside the decoding, in line order: admitted,
    // they prefill at once. Their embeddings wait for them in the vision worker. A prompt refused
    // by its checks ends here, wherever it is in line.
    size_t k = 0;
    for (auto it = waiting_.begin(); it != waiting_.end() && k < cfg_.max_seqs; k++) {
        Waiting & w = *it;
        if (!take_prepared(w)) {
            ++it;
            continue;
        }
        if (w.prompt.failed()) {
            Ending e = w.prompt.error;
            end_waiting(it, std::move(e));
            it = waiting_.erase(it);
            continue;
        }
        if (!w.images_queued) {
            queue_images(w.prompt.parts, w.prompt.chunks, w.prompt.images);
            w.images_queued = true;
        }
        ++it;
    }
}

void Scheduler::queue_images(std::vector<PromptPart> & parts, const SharedChunks & chunks, const std::vector<ImagePtr> & images) {
    // Every image not handed over yet (one queued while its request waited is); the k-th image part
    // is the request's k-th image (our encoder preprocesses the pixels itself).
    size_t k = 0;
    for (auto & part : parts) {
        if (!part.media) continue;
        ImagePtr img = k < images.size() ? images[k] : nullptr;
        k++;
        if (part.vision_key || part.embd) continue;
        part.vision_key = next_vision_key_++;
        vision_jobs_.push_back(VisionWorker::Job{part.vision_key, chunks, part.media, std::move(img)});
    }
}

void Scheduler::submit_queued_images() {
    // One hand-over per step, so that one encoder pass takes all of a step's images.
    if (!vision_jobs_.empty()) io_.encode(std::move(vision_jobs_));
    vision_jobs_.clear();
}

// ---- admission and KV accounting ----

void Scheduler::admit(StepPlan & plan) {
    while (!waiting_.empty()) {
        Waiting & w = waiting_.front();
        if (w.prep != Prep::kReady) break;  // still being prepared: admission stays in order
        const int32_t n = w.req.n;
        // Preempted sequences resume before anything new starts.
        if (free_seq_ids_.size() < (size_t) n) break;
        if (std::any_of(running_.begin(), running_.end(), [](const Sequence & q) { return q.state() == SeqState::kPreempted; })) break;
        Sequence seq;
        seq.prompt_cells = w.prompt.prompt_cells;
        // n = 1 needs room for its prompt and a first token; n > 1 reserves the shared prompt plus
        // every choice's whole output.
        const int64_t out_cells = std::max(w.req.sampling.max_tokens, 1);
        const int64_t want = n == 1 ? seq.prompt_cells + 1 : seq.prompt_cells + n * out_cells;
        if (cells_committed(true) + want + growth_watermark() > cfg_.kv_cells) break;  // not enough free cells yet
        seq.req = std::move(w.req);
        seq.chunks = std::move(w.prompt.chunks);
        seq.parts = std::move(w.prompt.parts);
        seq.req.images = std::move(w.prompt.images);
        seq.orig_parts = seq.parts.size();
        waiting_.pop_front();
        if (n > 1) {
            // Choices 1..n-1 each hold an equal share of the output cells; choice 0 holds the rest.
            seq.pinned = true;
            seq.choice_reserved_cells = (int32_t) ((want - seq.prompt_cells) / n);
            seq.reserved_cells = (int32_t) (want - (int64_t) (n - 1) * seq.choice_reserved_cells);
            reserved_cells_ += want;
        }
        seq.seq_id = take_seq_id();
        for (int32_t k = 1; k < n; k++) seq.choice_seq_ids.push_back(take_seq_id());
        seq.pending.id = seq.req.id;
        seq.admitted = std::chrono::steady_clock::now();
        counters_.prompt_tokens_total += seq.prompt_cells;
        queue_images(seq.parts, seq.chunks, seq.req.images);  // unless queued while it waited
        running_.push_back(std::move(seq));
        plan.progress = true;
    }
    counters_.waiting = (uint32_t) waiting_.size();
}

int64_t Scheduler::growth_watermark() const {
    // Cells kept free for running sequences to grow into before starting (or resuming) a prompt,
    // so that preemption does not thrash: 32 tokens per unpinned running sequence, at most 1/4 of the pool.
    int64_t running = 0;
    for (const auto & seq : running_) running += !seq.pinned && !seq.finished();
    return std::min<int64_t>(running * 32, cfg_.kv_cells / 4);
}

int64_t Scheduler::cells_committed(bool with_prefill) const {
    int64_t cells = reserved_cells_;
    for (const auto & seq : running_) {
        if (seq.pinned || seq.finished()) continue;
        cells += seq.at.cells + (with_prefill ? seq.prefill_left() : 0);
    }
    return cells;
}

Sequence * Scheduler::youngest_unpinned_with_cells() {
    for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
        if (!it->pinned && !it->finished() && it->at.cells > 0) return &*it;
    }
    return nullptr;
}

void Scheduler::make_room(StepPlan & plan) {
    for (;;) {
        int64_t need = cells_committed(false);
        for (const auto & seq : running_) {
            if (!seq.pinned && seq.decoding()) need++;
        }
        if (need <= cfg_.kv_cells) return;
        // The youngest unpinned sequence holding cells gives them back.
        Sequence * victim = youngest_unpinned_with_cells();
        if (!victim) return;
        preempt(*victim, plan.kv);
    }
}

void Scheduler::preempt(Sequence & seq, std::vector<KvOp> & kv) {
    kv.push_back({KvOp::kFree, seq.seq_id});
    for (auto & part : seq.parts) {
        if (part.vision_key) io_.drop_encoded(part.vision_key);
        part.vision_key = 0;
        part.embd.reset();
    }
    // Later: prefill the prompt and every generated token again; its last logits continue the output.
    seq.parts.resize(seq.orig_parts);
    if (!seq.generated.empty()) {
        PromptPart resume;
        resume.tokens = seq.generated;
        seq.parts.push_back(std::move(resume));
    }
    seq.set_state(SeqState::kPreempted);
    seq.at = PromptCursor{};
    queue_images(seq.parts, seq.chunks, seq.req.images);
    counters_.preemptions++;
}

bool Scheduler::may_start_resume(const Sequence & seq, int64_t free_cells) const {
    // A preempted sequence starts again only when all of it fits with room to grow, whether or not
    // it had generated tokens (one preempted in its prompt would otherwise fill the pool again at
    // once and be preempted again, and again, while the others grow).
    const bool not_started = seq.state() == SeqState::kPreempted && seq.at == PromptCursor{};
    if (!not_started) return true;
    // Alone in the pool it always fits (its length is bounded by max_model_len <= the pool).
    const bool alone = std::none_of(running_.begin(), running_.end(), [&](const Sequence & q) {
        return &q != &seq && !q.finished() && (q.at.cells > 0 || q.pinned);
    });
    return alone || free_cells >= seq.prefill_left() + growth_watermark();
}

// ---- sequence ids: the per-sequence KV layout keeps decoding sequences on ids 0..d-1 ----

// With a KV stream per sequence llama.cpp cuts a batch into ubatches of consecutive sequence ids
// (the ubatch's streams are one slice of the cache), and each ubatch is one pass over the weights.
// Finished sequences leave holes, so the decoding ones are kept on ids 0..d-1: the highest moves
// into a hole, its stream copied (the whole stream, at the next llama_decode: far less than a pass
// over the weights per extra ubatch). New sequences take the lowest free id, at or above d, so a
// request moves about once.
void Scheduler::pack_decoding_streams(StepPlan & plan) {
    if (!cfg_.per_sequence_kv) return;
    std::vector<Sequence *> movers;
    size_t d = 0;
    for (const auto & seq : running_) d += seq.decoding();
    std::vector<bool> decoder_at(d, false);
    for (auto & seq : running_) {
        if (!seq.decoding()) continue;
        if ((size_t) seq.seq_id < d) {
            decoder_at[seq.seq_id] = true;
        } else {
            movers.push_back(&seq);
        }
    }
    // The highest ids move first: what stays behind is as low as it can be.
    std::sort(movers.begin(), movers.end(), [](const Sequence * a, const Sequence * b) { return a->seq_id > b->seq_id; });
    size_t m = 0;
    for (llama_seq_id hole = 0; (size_t) hole < d && m < movers.size(); hole++) {
        if (decoder_at[hole]) continue;
        if (!free_seq_ids_.count(hole) && !vacate_seq_id(hole, (llama_seq_id) d, plan)) continue;  // the gap stays
        move_sequence(*movers[m++], hole, plan);
    }
}

bool Scheduler::vacate_seq_id(llama_seq_id id, llama_seq_id above, StepPlan & plan) {
    const auto to = free_seq_ids_.lower_bound(above);
    if (to == free_seq_ids_.end()) return false;
    for (auto & seq : running_) {
        if (seq.finished()) continue;
        if (seq.seq_id == id) {
            move_sequence(seq, *to, plan);
            return true;
        }
        // A choice's id, held until the prefill ends: nothing in the cache yet.
        auto c = std::find(seq.choice_seq_ids.begin(), seq.choice_seq_ids.end(), id);
        if (c != seq.choice_seq_ids.end()) {
            *c = *to;
            free_seq_ids_.erase(to);
            free_seq_ids_.insert(id);
            return true;
        }
    }
    return false;
}

void Scheduler::move_sequence(Sequence & seq, llama_seq_id to, StepPlan & plan) {
    if (seq.stream_cells() > 0) {
        plan.kv.push_back({KvOp::kMove, seq.seq_id, to});
        counters_.stream_moves++;
    }
    free_seq_ids_.erase(to);
    free_seq_ids_.insert(seq.seq_id);
    seq.seq_id = to;
}

llama_seq_id Scheduler::take_seq_id() {
    const llama_seq_id id = *free_seq_ids_.begin();
    free_seq_ids_.erase(free_seq_ids_.begin());
    return id;
}

// ---- the step ----

bool Scheduler::prompt_as_rows(const Sequence & seq) const { return cfg_.image_prompt_rows && seq.has_images(); }

int32_t Scheduler::take_encoded_images(Sequence & seq, bool all) {
    bool waiting = false;
    for (size_t i = seq.at.part; i < seq.parts.size(); i++) {
        PromptPart & part = seq.parts[i];
        if (part.vision_key) {
            double seconds = 0;
            Embeddings embd;
            if (!io_.take_encoded(part.vision_key, embd, seconds)) {
                waiting = true;
            } else {
                part.vision_key = 0;
                seq.image_encode_seconds += seconds;
                if (!embd) {
                    seq.end(Ending{FinishReason::kError, ErrorKind::kInternal, "the vision encoder failed on this image"});
                    return 0;
                }
                part.embd = std::move(embd);
            }
        }
        if (!all) break;
    }
    return waiting ? -1 : 1;
}

Sequence Scheduler::fork_choice(const Sequence & parent, int32_t index, llama_seq_id seq_id, const PromptCursor & end) const {
    Sequence c;
    c.req.id = parent.req.id;
    c.req.sampling = parent.req.sampling;
    c.req.arrived = parent.req.arrived;
    c.admitted = parent.admitted;
    if (c.req.sampling.seed >= 0) c.req.sampling.seed += index;  // distinct but reproducible streams
    c.index = index;
    c.pinned = true;
    c.seq_id = seq_id;
    c.prompt_cells = parent.prompt_cells;
    c.shared_cells = end.cells;
    c.reserved_cells = parent.choice_reserved_cells;
    c.at.n_past = end.n_past;
    c.pending.id = c.req.id;
    c.pending.index = index;
    c.set_state(SeqState::kDecoding);
    return c;
}

void Scheduler::plan_prompts(StepPlan & plan, int32_t & budget, int64_t & free_cells) {
    // Rows larger than what is left go in over several steps, in whole ubatches, so they meet the
    // same ubatches as in one piece; when nothing else went in, a prompt advances by one ubatch
    // over the budget.
    int32_t rows_planned = 0;
    int32_t tokens_planned = 0;
    const int32_t ubatch = cfg_.n_ubatch;
    // Of n prompt cells, what a sequence may take now: an unpinned one only free cells, and none
    // while it waits to resume after a preemption.
    const auto room_for = [&](const Sequence & seq, int32_t n) -> int32_t {
        if (seq.pinned) return n;
        if (!may_start_resume(seq, free_cells)) return 0;
        return (int32_t) std::min<int64_t>(n, std::max<int64_t>(free_cells, 0));
    };
    for (auto & seq : running_) {
        if (!seq.prefilling()) continue;
        // An image prompt, with the token-embedding table: all of it but its last token, as
        // embedding rows, once its images are encoded (its last token goes in the batch, whose
        // logits give the first output). Otherwise: the current image's rows only.
        const bool with_text = prompt_as_rows(seq);
        PromptCursor at = seq.at;
        if (at.part >= seq.parts.size()) continue;
        const PromptPart & part = seq.parts[at.part];
        const int32_t left = with_text ? seq.prefill_left() - 1 : part.media ? part.n_cells() - at.done : 0;
        if (left > 0) {
            int32_t allow = left <= budget ? left : std::max(budget, 0) / ubatch * ubatch;
            if (allow == 0 && rows_planned == 0 && tokens_planned == 0) allow = std::min(left, ubatch);
            if (allow > 0) allow = room_for(seq, allow);
            if (allow > 0) {
                const int32_t ready = take_encoded_images(seq, with_text);
                if (ready == 0) plan.progress = true;  // an image failed: the sequence ended
                if (ready <= 0) continue;
                // A model that attends within an image both ways takes it in one piece.
                const bool whole = !with_text && part.media && part.non_causal;
                const int32_t rest = part.n_cells() - at.done;
                const int32_t n = with_text ? allow : whole ? rest : std::min(allow, rest);
                const PromptCursor to = advance(seq.parts, at, n);
                plan.rows.push_back(RowsDecode{&seq, at, to, n, with_text, whole});
                rows_planned += n;
                budget -= n;
                if (!seq.pinned) free_cells -= n;
                at = to;
            }
        }
        // Text: a text prompt's, or the last token of an image prompt whose rows are all in.
        if (at.part >= seq.parts.size() || seq.parts[at.part].media) continue;
        if (with_text && cells_left(seq.parts, at) != 1) continue;
        if (budget <= 0) continue;
        const auto & toks = seq.parts[at.part].tokens;
        const int32_t take = room_for(seq, std::min<int32_t>(budget, (int32_t) toks.size() - at.done));
        if (take == 0) continue;
        if (!seq.pinned) free_cells -= take;
        const PromptCursor to = advance(seq.parts, at, take);
        // Its last prompt token: its logits give the first generated token.
        const bool last = to.part >= seq.parts.size();
        plan.batch.push_back(BatchRows{&seq, at, to, false, last});
        budget -= take;
        tokens_planned += take;
        if (last && seq.state() == SeqState::kPrefilling && !seq.choice_seq_ids.empty()) {
            // Prefill done: choices 1..n-1 share its KV cells and its last logits.
            for (size_t k = 0; k < seq.choice_seq_ids.size(); k++) {
                plan.forks.push_back(fork_choice(seq, (int32_t) k + 1, seq.choice_seq_ids[k], to));
                plan.fork_parents.push_back(&seq);
            }
        }
    }
}

StepPlan Scheduler::schedule() {
    StepPlan plan;
    plan.kv = std::move(deferred_kv_);
    deferred_kv_.clear();
    prepare_ahead();
    encode_waiting();
    admit(plan);
    prepare_ahead();
    encode_waiting();
    submit_queued_images();  // admitted this step, and waiting: one hand-over, one encoder pass
    counters_.running = (uint32_t) running_.size();
    if (running_.empty()) return plan;

    make_room(plan);
    submit_queued_images();  // preempted this step
    pack_decoding_streams(plan);
    // Cells unpinned prompts may take this step, after every decoding sequence's next token.
    int64_t free_cells = cfg_.kv_cells - cells_committed(false);
    for (const auto & seq : running_) {
        if (!seq.pinned && seq.decoding()) free_cells--;
    }
    // The step's budget (--max-num-batched-tokens): every decoding sequence's next token first,
    // then prompts, oldest request first: embedding rows (an image prompt's, or an image's) in
    // llama_decode calls of their own, text into the batch.
    int32_t budget = cfg_.n_batch;
    for (auto & seq : running_) {
        if (!seq.decoding()) continue;
        plan.batch.push_back(BatchRows{&seq, seq.at, seq.at, true, true});
        plan.decoding++;
        budget--;
    }
    plan_prompts(plan, budget, free_cells);
    // The rows go in sequence-id order. With a KV stream per sequence, llama.cpp cuts a batch into
    // ubatches of consecutive sequence ids, scanning in batch order, and each ubatch is one pass
    // over the weights: in admission order a decode step of 8 sequences took several passes.
    std::sort(plan.batch.begin(), plan.batch.end(), [](const BatchRows & a, const BatchRows & b) { return a.seq->seq_id < b.seq->seq_id; });
    return plan;
}

// ---- what the runner did ----

void Scheduler::no_kv_room(Sequence & failed, std::vector<KvOp> & kv) {
    // llama_decode found no KV room for its cells: the youngest unpinned sequence holding cells
    // gives them back (as make_room would have), and the rest of the step is tried again next step.
    Sequence * victim = youngest_unpinned_with_cells();
    if (victim) {
        preempt(*victim, kv);
    } else {
        failed.end(Ending{FinishReason::kError, ErrorKind::kCapacity, "the KV cache has no room for this batch"});
    }
}

void Scheduler::update(StepPlan & plan, const StepResult & result) {
    std::vector<const Sequence *> rows_failed;
    for (size_t i = 0; i < plan.rows.size(); i++) {
        const RowsDecode & r = plan.rows[i];
        Sequence & seq = *r.seq;
        const int32_t rc = result.rows_rc[i];
        if (rc != 0) rows_failed.push_back(&seq);
        if (seq.finished()) continue;
        if (rc == 0) {
            // Images all in: their embeddings are no longer needed.
            for (size_t p = r.from.part; p < r.to.part; p++) seq.parts[p].embd.reset();
            seq.at = r.to;
        } else if (rc == 1) {
            no_kv_room(seq, deferred_kv_);
        } else {
            seq.end(Ending{FinishReason::kError, ErrorKind::kInternal,
                           rc == kRowsUnreadable ? "reading the token embeddings failed" : "decoding the prompt's embedding rows failed"});
        }
    }
    if (plan.batch.empty()) return;
    const auto in_batch = [&](const BatchRows & b) {
        return std::find(rows_failed.begin(), rows_failed.end(), b.seq) == rows_failed.end();
    };
    if (result.batch_rc == 1) {
        Sequence * first = nullptr;
        for (const auto & b : plan.batch) {
            if (in_batch(b) && !b.seq->finished()) first = first ? first : b.seq;
        }
        if (first) no_kv_room(*first, deferred_kv_);
        return;  // the choices planned to fork wait for the next prefill end
    }
    if (result.batch_rc != 0) {
        const std::string why = "llama_decode failed (" + std::to_string(result.batch_rc) + ")";
        for (const auto & b : plan.batch) {
            if (in_batch(b)) b.seq->end(Ending{FinishReason::kError, ErrorKind::kInternal, why});
        }
        return;
    }
    std::vector<const Sequence *> prefilled;  // first prefills that ended: their choices start
    for (const auto & b : plan.batch) {
        if (!in_batch(b)) continue;
        Sequence & seq = *b.seq;
        if (b.decode) {
            // The token sampled last step is in the cache now.
            seq.at.n_past++;
            seq.at.cells++;
        } else {
            seq.at = b.to;
        }
        if (!b.logits || !seq.prefilling()) continue;
        // Its prompt is all in (again, after a preemption: the resume part re-created its output);
        // a first prefill's choices start now (plan.forks), holding their ids.
        if (seq.state() == SeqState::kPrefilling) {
            seq.choice_seq_ids.clear();
            prefilled.push_back(&seq);
        }
        seq.set_state(SeqState::kDecoding);
    }
    size_t k = 0;
    for (auto fork = plan.forks.begin(); fork != plan.forks.end(); k++) {
        const bool started = std::find(prefilled.begin(), prefilled.end(), plan.fork_parents[k]) != prefilled.end();
        auto next = std::next(fork);
        if (started) running_.splice(running_.end(), plan.forks, fork);
        fork = next;
    }
}

void Scheduler::release_finished() {
    for (auto it = running_.begin(); it != running_.end();) {
        if (!it->finished()) {
            ++it;
            continue;
        }
        for (const auto & part : it->parts) {
            if (part.vision_key) io_.drop_encoded(part.vision_key);
        }
        // Its cells go before the next decode; choices never forked give their ids back too.
        deferred_kv_.push_back({KvOp::kFree, it->seq_id});
        free_seq_ids_.insert(it->seq_id);
        for (llama_seq_id c : it->choice_seq_ids) {
            free_seq_ids_.insert(c);
            reserved_cells_ -= it->choice_reserved_cells;
        }
        reserved_cells_ -= it->reserved_cells;
        it = running_.erase(it);
    }
    uint32_t used = 0;
    for (const auto & seq : running_) used += seq.at.cells;
    counters_.kv_used_cells = used;
    counters_.running = (uint32_t) running_.size();
}

}  // namespace caprl
