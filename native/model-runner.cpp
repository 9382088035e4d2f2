#include "model-runner.h"

#include <algorithm>
#include <cstring>

namespace caprl {

namespace {

using Clock = std::chrono::steady_clock;

uint64_t ns_between(Clock::time_point from, Clock::time_point to) {
    return (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(to - from).count();
}

}  // namespace

ModelRunner::ModelRunner(llama_context * ctx, mtmd_context * mtmd, std::unique_ptr<TokenEmbeddings> token_embd, const llama_vocab * vocab,
                         int32_t n_vocab, const EogTokens & eog, int32_t sampling_threads, RunnerCounters & counters)
    : ctx_(ctx), mtmd_(mtmd), token_embd_(std::move(token_embd)), vocab_(vocab), n_vocab_(n_vocab), eog_(eog),
      n_embd_(llama_model_n_embd_inp(llama_get_model(ctx))), sampling_(sampling_threads), counters_(counters) {
    batch_ = llama_batch_init((int32_t) llama_n_batch(ctx_), 0, 1);
}

ModelRunner::~ModelRunner() { llama_batch_free(batch_); }

void ModelRunner::apply(const std::vector<KvOp> & ops) {
    llama_memory_t mem = llama_get_memory(ctx_);
    for (const KvOp & op : ops) {
        if (op.kind == KvOp::kMove) llama_memory_seq_cp(mem, op.seq, op.to, -1, -1);
        llama_memory_seq_rm(mem, op.seq, -1, -1);
    }
}

int32_t ModelRunner::decode_rows(const RowsDecode & r) {
    const Sequence & seq = *r.seq;
    // The rows' pieces: from the cursor's part on; an image's rows by its row index, text by token.
    struct Segment {
        size_t part;
        int32_t first;
        int32_t n;
    };
    std::vector<Segment> segs;
    int32_t total = 0;
    for (size_t i = r.from.part; i < seq.parts.size() && total < r.rows; i++) {
        const PromptPart & p = seq.parts[i];
        const int32_t first = i == r.from.part ? r.from.done : 0;
        const int32_t k = std::min(r.rows - total, p.n_cells() - first);
        if (k > 0) segs.push_back({i, first, k});
        total += k;
    }

    // Embeddings: one image's rows are passed in place; a mix (text and image, or two images) is
    // gathered into one buffer. Positions, for M-RoPE by section (all t, then y, x, z) as
    // llama_batch takes them: an image's rows keep the positions they have in one piece, text rows
    // the same position in every section (as llama.cpp gives a token batch).
    const bool mrope = mtmd_decode_use_mrope(mtmd_);
    const bool in_place = segs.size() == 1 && seq.parts[segs[0].part].media;
    if (!in_place) rows_buf_.resize((size_t) total * n_embd_);
    std::vector<llama_pos> pos((size_t) total * (mrope ? 4 : 1));
    const auto set_pos = [&](int32_t row, llama_pos t, llama_pos y, llama_pos x, llama_pos z) {
        pos[row] = t;
        if (!mrope) return;
        pos[row + total] = y;
        pos[row + 2 * total] = x;
        pos[row + 3 * total] = z;
    };
    llama_pos n_past = r.from.n_past;
    int32_t row = 0;
    for (const Segment & sg : segs) {
        const PromptPart & p = seq.parts[sg.part];
        if (p.media) {
            if (!in_place) memcpy(rows_buf_.data() + (size_t) row * n_embd_, p.embd->data() + (size_t) sg.first * n_embd_, (size_t) sg.n * n_embd_ * sizeof(float));
            const mtmd_image_tokens * image = mtmd_input_chunk_get_tokens_image(p.media);
            for (int32_t i = 0; i < sg.n; i++, row++) {
                if (mrope && image) {
                    const mtmd_decoder_pos d = mtmd_image_tokens_get_decoder_pos(image, n_past, (size_t) (sg.first + i));
                    set_pos(row, (llama_pos) d.t, (llama_pos) d.y, (llama_pos) d.x, (llama_pos) d.z);
                } else {
                    set_pos(row, n_past + sg.first + i, 0, 0, 0);
                }
            }
            // M-RoPE: what follows an image continues at its start + max(rows, cols), not + cells.
            if (sg.first + sg.n == p.n_cells()) n_past += p.media_pos;
        } else {
            if (!token_embd_ || !token_embd_->rows(p.tokens.data() + sg.first, sg.n, rows_buf_.data() + (size_t) row * n_embd_)) return kRowsUnreadable;
            for (int32_t i = 0; i < sg.n; i++, row++) set_pos(row, n_past + i, n_past + i, n_past + i, n_past + i);
            n_past += sg.n;
        }
    }

    std::vector<int32_t> n_seq_id(total, 1);
    llama_seq_id sid = seq.seq_id;
    std::vector<llama_seq_id *> seq_ids(total, &sid);
    std::vector<int8_t> logits(total, 0);
    llama_batch batch{};
    batch.n_tokens = total;
    batch.embd = in_place ? const_cast<float *>(seq.parts[segs[0].part].embd->data()) + (size_t) segs[0].first * n_embd_ : rows_buf_.data();
    batch.pos = pos.data();
    batch.n_seq_id = n_seq_id.data();
    batch.seq_id = seq_ids.data();
    batch.logits = logits.data();
    const auto started = Clock::now();
    if (r.whole) llama_set_causal_attn(ctx_, false);
    const int32_t rc = llama_decode(ctx_, batch);
    if (r.whole) llama_set_causal_attn(ctx_, true);
    counters_.model_ns += ns_between(started, Clock::now());
    return rc;
}

StepResult ModelRunner::execute(StepPlan & plan) {
    StepResult result;
    apply(plan.kv);
    std::vector<const Sequence *> failed;  // prompts whose rows failed: their batch rows stay out
    for (const RowsDecode & r : plan.rows) {
        result.rows_rc.push_back(decode_rows(r));
        if (result.rows_rc.back() != 0) failed.push_back(r.seq);
    }
    if (plan.batch.empty()) return result;

    batch_.n_tokens = 0;
    const auto add = [&](llama_token tok, llama_pos pos, llama_seq_id sid, bool logits) {
        const int32_t j = batch_.n_tokens++;
        batch_.token[j] = tok;
        batch_.pos[j] = pos;
        batch_.n_seq_id[j] = 1;
        batch_.seq_id[j][0] = sid;
        batch_.logits[j] = logits;
    };
    std::vector<std::pair<Sequence *, int32_t>> logit_rows;  // (sequence, its row of the step's logits)
    for (const BatchRows & b : plan.batch) {
        if (std::find(failed.begin(), failed.end(), b.seq) != failed.end()) continue;
        Sequence & seq = *b.seq;
        if (b.decode) {
            add(seq.next, b.from.n_past, seq.seq_id, true);
        } else {
            const auto & toks = seq.parts[b.from.part].tokens;
            const int32_t n = b.to.cells - b.from.cells;
            for (int32_t i = 0; i < n; i++) add(toks[b.from.done + i], b.from.n_past + i, seq.seq_id, false);
            batch_.logits[batch_.n_tokens - 1] = b.logits;
        }
        if (b.logits) logit_rows.emplace_back(&seq, batch_.n_tokens - 1);
    }
    if (batch_.n_tokens == 0) return result;
    const auto decode_started = Clock::now();
    result.batch_rc = llama_decode(ctx_, batch_);
    if (result.batch_rc != 0) {
        counters_.model_ns += ns_between(decode_started, Clock::now());
        return result;
    }
    // Choices whose prompt ended in this batch: its cells copied, its last logits shared.
    llama_memory_t mem = llama_get_memory(ctx_);
    std::vector<std::pair<Sequence *, int32_t>> rows = logit_rows;
    size_t k = 0;
    for (auto fork = plan.forks.begin(); fork != plan.forks.end(); ++fork, ++k) {
        const Sequence * parent = plan.fork_parents[k];
        const auto at = std::find_if(logit_rows.begin(), logit_rows.end(), [&](const auto & r) { return r.first == parent; });
        if (at == logit_rows.end()) continue;  // its prompt's rows failed: no prefill end this step
        llama_memory_seq_cp(mem, parent->seq_id, fork->seq_id, -1, -1);
        rows.emplace_back(&*fork, at->second);
    }
    // Every sequence's token at once, on the sampling threads: a draw reads only its logits row
    // and its own sampler, so the tokens are the same whichever thread draws them. The rows are
    // looked up first, on this thread: llama.cpp puts a step's outputs back in batch order lazily,
    // swapping rows on the first read (with a stream per sequence the ubatch orders them by
    // sequence id), and that must not run on several threads at once.
    std::vector<const float *> logits(rows.size());
    // The first read waits for the step's compute: the model's time ends here.
    for (size_t i = 0; i < rows.size(); i++) logits[i] = llama_get_logits_ith(ctx_, rows[i].second);
    const auto draws_started = Clock::now();
    counters_.model_ns += ns_between(decode_started, draws_started);
    for (auto & [seq, row] : rows) {
        if (!seq->sampler) seq->sampler = std::make_unique<Sampler>(vocab_, n_vocab_, seq->req.sampling, eog_);
    }
    result.draws.resize(rows.size());
    sampling_.run(rows.size(), [&](size_t i) {
        Sequence & seq = *rows[i].first;
        const SamplingParams & sp = seq.req.sampling;
        StepResult::Draw & d = result.draws[i].second;
        d.suppress_eog = sp.ignore_eos || seq.n_generated < sp.min_tokens;
        d.token = seq.sampler->sample(logits[i], d.suppress_eog, sp.logprobs >= 0 ? &d.logprob : nullptr, std::max(sp.logprobs, 0));
    });
    for (size_t i = 0; i < rows.size(); i++) result.draws[i].first = rows[i].first;
    counters_.sample_ns += ns_between(draws_started, Clock::now());
    return result;
}

}  // namespace caprl
