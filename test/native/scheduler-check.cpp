// The scheduler's decisions with no model: a fake prompt prep (prompts described as text tokens
// and image sizes) and a fake vision worker, a fake runner that reports every decode as done, a
// fake output that draws token 7 until max_tokens. Prints TAP lines ("ok N - ..." / "not ok N -
// ...") and a summary; test/scheduler.test.ts runs it.
#include "scheduler.h"

#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <string>

using namespace caprl;

namespace {

int n_checks = 0, n_failed = 0;
std::string scenario;

void check(bool ok, const std::string & what) {
    n_checks++;
    if (!ok) n_failed++;
    printf("%s %d - %s: %s\n", ok ? "ok" : "not ok", n_checks, scenario.c_str(), what.c_str());
}

template <typename A, typename B>
void check_eq(const A & got, const B & want, const std::string & what) {
    const bool ok = got == (A) want;
    check(ok, what + (ok ? "" : " (got " + std::to_string(got) + ", want " + std::to_string(want) + ")"));
}

// A prompt as the fake prep reports it: text parts (token counts) and images (cells, positions).
struct PromptSpec {
    std::vector<int32_t> parts;  // > 0: that many text tokens; < 0: an image of -x cells
    int32_t image_pos = 0;       // positions an image advances (0: its cells)
};

// Stands in for a media chunk: the scheduler only passes the pointer on.
const mtmd_input_chunk * fake_chunk(int k) { return reinterpret_cast<const mtmd_input_chunk *>(static_cast<uintptr_t>(0x1000 + 16 * k)); }

struct FakeIo : SchedulerIo {
    std::map<int64_t, PromptSpec> prompts;   // what prep makes of each request
    std::set<int64_t> prep_blocked;          // requests whose prep is not done yet
    std::vector<int64_t> prep_order;         // requests handed to prep, in order
    std::set<uint64_t> encode_blocked_all;   // when non-empty, every image waits (keys ignored)
    bool encode_waits = false;
    std::vector<uint64_t> encoded;           // images handed to the vision worker, in order
    std::set<uint64_t> dropped_images;
    std::set<int64_t> dropped_prompts;
    int encode_calls = 0;

    void prepare(std::vector<PromptJob> && jobs) override {
        for (auto & j : jobs) prep_order.push_back((int64_t) j.key);
    }
    bool take_prepared(int64_t id, PreparedPrompt & out) override {
        if (prep_blocked.count(id)) return false;
        const PromptSpec & spec = prompts.at(id);
        out = PreparedPrompt{};
        int img = 0;
        for (int32_t x : spec.parts) {
            PromptPart p;
            if (x > 0) {
                p.tokens.assign(x, 5);
            } else {
                p.media = fake_chunk(img++);
                p.media_cells = -x;
                p.media_pos = spec.image_pos > 0 ? spec.image_pos : -x;
            }
            out.prompt_cells += p.n_cells();
            out.parts.push_back(std::move(p));
        }
        return true;
    }
    void drop_prepared(int64_t id) override { dropped_prompts.insert(id); }
    void encode(std::vector<VisionWorker::Job> && jobs) override {
        encode_calls++;
        for (auto & j : jobs) encoded.push_back(j.key);
    }
    bool take_encoded(uint64_t key, Embeddings & embd, double & seconds) override {
        if (encode_waits) return false;
        embd = std::make_shared<const std::vector<float>>(1, 0.0f);
        seconds = 0.5;
        (void) key;
        return true;
    }
    void drop_encoded(uint64_t key) override { dropped_images.insert(key); }
};

struct Harness {
    FakeIo io;
    SchedulerCounters counters;
    Scheduler sched;
    int64_t next_id = 1;
    std::vector<std::pair<int64_t, Ending>> ended;  // requests ended without a sequence
    std::vector<std::pair<int64_t, PromptAccepted>> accepted;
    int32_t batch_rc = 0;  // what the fake runner reports for the next batch
    StepPlan last;         // the last step's plan (its decisions; sequences may be gone)
    std::vector<KvOp> last_kv;

    explicit Harness(SchedulerConfig cfg) : sched(cfg, io, counters) {}

    int64_t submit(PromptSpec spec, int32_t max_tokens, int32_t n = 1) {
        Request r;
        r.id = next_id++;
        r.n = n;
        r.sampling.max_tokens = max_tokens;
        io.prompts[r.id] = std::move(spec);
        sched.add(std::move(r));
        return r.id;
    }

    Sequence * seq(int64_t id, int32_t index = 0) {
        for (auto & s : sched.running()) {
            if (s.req.id == id && s.index == index) return &s;
        }
        return nullptr;
    }

    // One step as the engine's: what ended outside a step released, schedule, "execute", update,
    // draw token 7 for each row with logits, release.
    void step() {
        collect();
        StepPlan plan = sched.schedule();
        last_kv = plan.kv;
        StepResult r;
        r.rows_rc.assign(plan.rows.size(), 0);
        r.batch_rc = plan.batch.empty() ? 0 : batch_rc;
        if (!plan.batch.empty() && r.batch_rc == 0) {
            for (const auto & b : plan.batch) {
                if (b.logits) r.draws.push_back({b.seq, StepResult::Draw{7}});
            }
            for (auto & f : plan.forks) r.draws.push_back({&f, StepResult::Draw{7}});
        }
        sched.update(plan, r);
        for (auto & [s, d] : r.draws) {
            if (s->finished()) continue;
            s->n_generated++;
            if (s->n_generated >= s->req.sampling.max_tokens) {
                s->end(Ending{FinishReason::kLength});
                continue;
            }
            s->next = d.token;
            s->generated.push_back(d.token);
        }
        last = std::move(plan);
        collect();
    }

    void collect() {
        for (auto & u : sched.take_unadmitted()) ended.push_back({u.id, u.ending});
        for (auto & a : sched.take_accepted()) accepted.push_back(a);
        sched.release_finished();
    }

    void steps(int n) {
        for (int i = 0; i < n; i++) step();
    }

    bool running(int64_t id) { return seq(id) != nullptr; }
    std::vector<int64_t> running_ids() {
        std::vector<int64_t> out;
        for (auto & s : sched.running()) out.push_back(s.req.id);
        return out;
    }
    const Ending * ending_of(int64_t id) {
        for (auto & e : ended) {
            if (e.first == id) return &e.second;
        }
        return nullptr;
    }
};

SchedulerConfig config(uint32_t max_seqs, int64_t kv_cells, uint32_t max_model_len, int32_t n_batch = 512, bool per_seq = false) {
    SchedulerConfig c;
    c.max_seqs = max_seqs;
    c.kv_cells = kv_cells;
    c.max_model_len = max_model_len;
    c.n_batch = n_batch;
    c.n_ubatch = std::min(n_batch, 512);
    c.per_sequence_kv = per_seq;
    return c;
}

bool has_op(const std::vector<KvOp> & ops, KvOp::Kind kind, llama_seq_id seq, llama_seq_id to = -1) {
    for (const auto & op : ops) {
        if (op.kind == kind && op.seq == seq && (kind == KvOp::kFree || op.to == to)) return true;
    }
    return false;
}

void admission_order() {
    scenario = "admission order";
    Harness h(config(4, 4096, 1024));
    const int64_t a = h.submit({{10}}, 4);
    const int64_t b = h.submit({{10}}, 4);
    h.io.prep_blocked.insert(a);
    h.step();
    check(h.running_ids().empty(), "a request still being prepared holds back the ones behind it");
    check(h.io.prep_order == std::vector<int64_t>{a, b}, "both were handed to prep, in order, in one step");
    h.io.prep_blocked.clear();
    h.step();
    check(h.running_ids() == std::vector<int64_t>{a, b}, "once ready, both start in one step, in arrival order");
    check_eq(h.seq(a)->seq_id, 0, "the first takes sequence id 0");
    check_eq(h.seq(b)->seq_id, 1, "the second id 1");
    check_eq(h.last.batch.size(), 2u, "both prompts go into that step's batch");
    check(h.accepted.size() == 2 && h.accepted[0].second.prompt_tokens == 10 && h.accepted[0].second.max_tokens == 4,
          "each prompt is accepted once, with its cells and max_tokens");
}

void slots() {
    scenario = "slots";
    Harness h(config(2, 4096, 1024));
    const int64_t a = h.submit({{4}}, 3), b = h.submit({{4}}, 8), c = h.submit({{4}}, 3);
    h.step();
    check(h.running(a) && h.running(b) && !h.running(c), "two sequence slots: the third request waits");
    h.steps(3);  // a: prefill + 2 decodes = 3 tokens, done
    check(!h.running(a), "the first request ran to max_tokens");
    h.step();
    check(h.running(c), "the waiting one starts once a slot is free");
    check_eq(h.seq(c)->seq_id, 0, "in the lowest free id");
}

void kv_admission() {
    scenario = "KV admission";
    // 100 cells: a 60-token prompt fits (with its first token and 32 cells of growth room);
    // a second 30-token prompt does not until the first ends.
    Harness h(config(4, 100, 100));
    const int64_t a = h.submit({{60}}, 5), b = h.submit({{30}}, 5);
    h.step();
    check(h.running(a) && !h.running(b), "a prompt that would not fit beside the running one waits");
    h.steps(5);
    check(!h.running(a), "the first ended");
    h.step();
    check(h.running(b), "then the second is admitted");
}

void preemption() {
    scenario = "preemption";
    // Two requests grow in a 48-cell pool: the younger one gives its cells back when a step
    // would overflow, resumes when the older one is done, and keeps every token.
    Harness h(config(4, 48, 48));
    const int64_t a = h.submit({{8}}, 30), b = h.submit({{4}}, 20);
    int guard = 0;
    while (h.counters.preemptions == 0 && guard++ < 60) h.step();
    check_eq((int) h.counters.preemptions, 1, "one preemption");
    Sequence * sb = h.seq(b);
    check(sb && sb->state() == SeqState::kPreempted, "the younger request is the one preempted");
    check(has_op(h.last_kv, KvOp::kFree, sb ? sb->seq_id : -1), "its cells are freed before that step's decodes");
    check(sb && sb->parts.size() == 2 && (int32_t) sb->parts[1].tokens.size() == sb->n_generated, "its output so far becomes a prompt part to prefill again");
    check(h.seq(a) && h.seq(a)->decoding(), "the older one keeps decoding");
    while (h.running(a) && guard++ < 200) {
        h.step();
        if (h.running(a) && h.seq(b)) check(h.seq(b)->state() == SeqState::kPreempted || !h.running(a), "it waits while the older one runs");
    }
    while (h.running(b) && guard++ < 300) h.step();
    check(!h.running(b) && guard < 300, "it resumes and runs to its max_tokens");
    check_eq((int) h.counters.preemptions, 1, "and is not preempted again");
}

void packing() {
    scenario = "packing";
    Harness h(config(4, 4096, 1024, 512, true));
    const int64_t a = h.submit({{4}}, 50), b = h.submit({{4}}, 2), c = h.submit({{4}}, 50), d = h.submit({{4}}, 50);
    h.step();
    check(h.seq(a)->seq_id == 0 && h.seq(b)->seq_id == 1 && h.seq(c)->seq_id == 2 && h.seq(d)->seq_id == 3, "ids 0..3 in arrival order");
    h.step();  // b's second token: done (ids freed at the end of the step)
    check(!h.running(b), "the short request ended");
    h.step();
    check_eq(h.seq(d)->seq_id, 1, "the highest decoding sequence moved into the hole");
    check(has_op(h.last_kv, KvOp::kMove, 3, 1), "its stream copied from 3 to 1 before the decode");
    check(has_op(h.last_kv, KvOp::kFree, 1), "after the finished one's cells were freed");
    bool sorted = true;
    for (size_t i = 1; i < h.last.batch.size(); i++) sorted = sorted && h.last.batch[i - 1].seq->seq_id < h.last.batch[i].seq->seq_id;
    check(sorted && h.last.batch.size() == 3, "the batch rows go in sequence-id order: 0, 1, 2");
    const int64_t e = h.submit({{4}}, 5);
    h.step();
    check_eq(h.seq(e)->seq_id, 3, "a new request takes the lowest free id");
}

void n_choices() {
    scenario = "n choices";
    Harness h(config(8, 4096, 1024));
    const int64_t a = h.submit({{6}}, 4, 3);
    h.step();
    check(h.seq(a) && h.seq(a)->pinned, "n = 3 reserves its cells (pinned)");
    check_eq(h.last.forks.size(), 0u, "the forks are handed over with the running sequences");
    check(h.seq(a, 1) && h.seq(a, 2), "choices 1 and 2 start when the prompt's prefill ends, in the same step");
    check(h.seq(a, 1) && h.seq(a, 1)->shared_cells == 6 && h.seq(a, 1)->at.n_past == 6, "a choice shares the prompt's 6 cells");
    check(h.seq(a, 1) && h.seq(a, 1)->n_generated == 1 && h.seq(a)->n_generated == 1, "each drew its first token from the prompt's logits");
    check(h.seq(a)->choice_seq_ids.empty(), "the parent no longer holds the choices' ids");
    h.step();
    check_eq(h.last.decoding, 3u, "next step: three decode rows");
    h.steps(3);
    check(h.sched.running().empty(), "all three end at max_tokens");
    // n larger than the sequences: refused at once.
    const int64_t big = h.submit({{6}}, 4, 9);
    h.step();
    const Ending * e = h.ending_of(big);
    check(e && e->kind == ErrorKind::kClient && e->param == "n", "n above --max-num-seqs: a client fault on n");
}

void chunked_images() {
    scenario = "chunked images";
    // An image prompt without the token table: text in the batch, the image's 1300 rows in
    // llama_decode calls of their own, in whole 512-row ubatches.
    Harness h(config(4, 8192, 4096, 512));
    const int64_t a = h.submit({{5, -1300, 7}, 37}, 3);
    h.step();
    check(h.io.encoded.size() == 1, "its image went to the vision worker when admitted");
    check(h.last.rows.empty() && h.last.batch.size() == 1, "first step: the text before the image, in the batch");
    h.step();
    check(h.last.rows.size() == 1 && h.last.rows[0].rows == 512, "then the image's rows, one ubatch over the budget at a time");
    h.step();
    Sequence * s = h.seq(a);
    check(s && s->at.part == 1 && s->at.done == 1024 && s->at.n_past == 5 && s->at.cells == 5 + 1024,
          "1024 rows in: cells counted per row, the position held until the image is whole");
    h.step();
    check(h.last.rows.size() == 1 && h.last.rows[0].rows == 276, "the last 276 rows");
    check(h.last.batch.size() == 1 && h.last.batch[0].logits && h.last.batch[0].to.cells - h.last.batch[0].from.cells == 7,
          "and, in the same step, the text after the image, whose last token gives the first output");
    check(s && s->at.n_past == 5 + 37 + 7 && s->at.cells == 5 + 1300 + 7, "positions advanced by the image's 37, not its 1300 cells");
    h.steps(3);
    check(!h.running(a), "its text and output follow");

    scenario = "image prompt as rows";
    SchedulerConfig cfg = config(4, 8192, 4096, 2048);
    cfg.image_prompt_rows = true;
    Harness r(cfg);
    const int64_t b = r.submit({{5, -100, 7}, 10}, 2);
    r.io.encode_waits = true;
    r.step();
    check(r.last.rows.empty() && r.last.batch.empty(), "nothing goes in while its image is encoding");
    r.io.encode_waits = false;
    r.step();
    check(r.last.rows.size() == 1 && r.last.rows[0].rows == 111 && r.last.rows[0].with_text, "then all but its last token, text and image, as one run of rows");
    check(r.last.batch.size() == 1 && r.last.batch[0].logits && r.last.batch[0].to.cells - r.last.batch[0].from.cells == 1,
          "its last token goes into the batch in the same step, for the first output");
    check(r.seq(b) && r.seq(b)->at.n_past == 5 + 10 + 7, "positions: 5 text, 10 for the image, 7 text");
}

void cancels() {
    scenario = "cancels";
    Harness h(config(2, 4096, 1024));
    const int64_t run1 = h.submit({{4}}, 100), run2 = h.submit({{4}}, 100);
    const int64_t queued_ready = h.submit({{1, -50, 2}}, 5);  // waits for a slot, prepared, its image encoded ahead
    h.step();
    h.step();
    check(!h.io.encoded.empty(), "a prepared request waiting for a slot has its image encoded ahead");
    h.sched.cancel(queued_ready);
    h.step();
    check(h.ending_of(queued_ready) && h.ending_of(queued_ready)->reason == FinishReason::kAbort, "cancelled while waiting: ends as abort");
    check(h.io.dropped_images.count(h.io.encoded.front()) == 1, "its queued image is dropped");
    const int64_t preparing = h.submit({{3}}, 5);
    h.io.prep_blocked.insert(preparing);
    h.step();
    h.sched.cancel(preparing);
    h.step();
    check(h.ending_of(preparing) && h.io.dropped_prompts.count(preparing) == 1, "cancelled while being prepared: dropped from prep");
    const llama_seq_id id1 = h.seq(run1)->seq_id;
    h.sched.cancel(run1);
    h.step();
    check(!h.running(run1) && has_op(h.last_kv, KvOp::kFree, id1), "cancelled while decoding: its cells are freed");
    h.sched.cancel(run2);
    h.step();
    check(h.sched.running().empty(), "nothing left running");
    const int64_t later = h.submit({{4}}, 2);
    h.steps(2);
    check(h.running(later) || h.ending_of(later) == nullptr, "the freed slots take new requests");
}

void no_kv_room() {
    scenario = "no KV room";
    Harness h(config(4, 4096, 1024));
    const int64_t a = h.submit({{4}}, 50), b = h.submit({{4}}, 50);
    h.steps(2);
    const PromptCursor at_a = h.seq(a)->at;
    const int32_t gen_a = h.seq(a)->n_generated;
    h.batch_rc = 1;  // llama_decode finds no room for the batch
    h.step();
    h.batch_rc = 0;
    check(h.seq(b) && h.seq(b)->state() == SeqState::kPreempted, "the youngest sequence is preempted");
    check(h.seq(a) && h.seq(a)->at == at_a && h.seq(a)->n_generated == gen_a && !h.seq(a)->finished(), "the other keeps its place, unfailed");
    h.step();
    check(h.seq(a) && h.seq(a)->n_generated == gen_a + 1, "and decodes at the next step");
    check(has_op(h.last_kv, KvOp::kFree, h.seq(b)->seq_id), "the preempted one's cells are freed before it");
}

void context_checks() {
    scenario = "context checks";
    Harness h(config(4, 4096, 100));
    const int64_t too_long = h.submit({{100}}, -1);
    const int64_t rest = h.submit({{40}}, -1);
    const int64_t over = h.submit({{40}}, 61);
    h.step();
    const Ending * e = h.ending_of(too_long);
    check(e && e->kind == ErrorKind::kClient && e->param == "prompt" && e->code == "context_length_exceeded" &&
              e->message == "This model's maximum context length is 100 tokens. However, you requested 100 tokens in the messages, Please reduce the length of the messages.",
          "a prompt as long as the context: vLLM's message, a client fault on the prompt");
    e = h.ending_of(over);
    check(e && e->param == "max_tokens" &&
              e->message == "This model's maximum context length is 100 tokens. However, you requested 101 tokens (40 in the messages, 61 in the completion). Please reduce the length of the messages or completion.",
          "prompt + max_tokens over the context: vLLM's message, on max_tokens");
    bool found = false;
    for (auto & [id, acc] : h.accepted) found = found || (id == rest && acc.max_tokens == 60 && acc.prompt_tokens == 40);
    check(found, "without max_tokens the output may take the rest of the context");
    check(h.accepted.size() == 1, "refused prompts are not accepted");

    // The rules and messages of vLLM's check, at its numbers (a 4096-token context, a 100-token prompt).
    Harness v(config(4, 65536, 4096));
    const int64_t absent = v.submit({{100}}, -1), fifty = v.submit({{100}}, 50), fits = v.submit({{100}}, 3996);
    const int64_t one_over = v.submit({{100}}, 3997), full = v.submit({{4096}}, -1), longer = v.submit({{5000}}, 1);
    v.step();
    const auto max_of = [&](int64_t id) {
        for (auto & [i, acc] : v.accepted) {
            if (i == id) return acc.max_tokens;
        }
        return -2;
    };
    check_eq(max_of(absent), 3996, "absent: the rest of the context");
    check_eq(max_of(fifty), 50, "50 as asked");
    check_eq(max_of(fits), 3996, "exactly fits");
    e = v.ending_of(one_over);
    check(e && e->param == "max_tokens" &&
              e->message == "This model's maximum context length is 4096 tokens. However, you requested 4097 tokens (100 in the messages, 3997 in the completion). Please reduce the length of the messages or completion.",
          "one over: refused on max_tokens");
    e = v.ending_of(full);
    check(e && e->param == "prompt" &&
              e->message == "This model's maximum context length is 4096 tokens. However, you requested 4096 tokens in the messages, Please reduce the length of the messages.",
          "a prompt the size of the context: refused on the prompt");
    e = v.ending_of(longer);
    check(e && e->code == "context_length_exceeded" && e->kind == ErrorKind::kClient, "a longer one: context_length_exceeded, a client fault");
}

}  // namespace

int main() {
    admission_order();
    slots();
    kv_admission();
    preemption();
    packing();
    n_choices();
    chunked_images();
    cancels();
    no_kv_room();
    context_checks();
    printf("# %d checks, %d failed\n", n_checks, n_failed);
    return n_failed == 0 ? 0 : 1;
}
