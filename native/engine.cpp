#include "engine.h"

#include "cpu-weights.h"
#include "token-embeddings.h"

#include "ggml-backend.h"
#include "mtmd-helper.h"

#include <cstring>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <thread>
#include <string_view>
#include <unordered_set>

namespace caprl {

namespace {

int log_threshold = GGML_LOG_LEVEL_WARN;

int parse_log_level(const std::string & s) {
    if (s == "none") return GGML_LOG_LEVEL_CONT + 1;
    if (s == "error") return GGML_LOG_LEVEL_ERROR;
    if (s == "info") return GGML_LOG_LEVEL_INFO;
    if (s == "debug") return GGML_LOG_LEVEL_DEBUG;
    return GGML_LOG_LEVEL_WARN;
}

void log_to_stderr(enum ggml_log_level level, const char * text, void *) {
    static int last = GGML_LOG_LEVEL_INFO;
    // CONT lines belong to the previous message's level.
    const int effective = level == GGML_LOG_LEVEL_CONT ? last : level;
    if (level != GGML_LOG_LEVEL_CONT) last = level;
    if (effective == GGML_LOG_LEVEL_NONE || effective < log_threshold) return;
    fputs(text, stderr);
}

using Clock = std::chrono::steady_clock;

// For the engine's time counters (atomic integers).
uint64_t ns_between(Clock::time_point from, Clock::time_point to) {
    return (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(to - from).count();
}

}  // namespace

void Engine::load() {
    log_threshold = parse_log_level(opts_.log_level);
    llama_log_set(log_to_stderr, nullptr);
    mtmd_helper_log_set(log_to_stderr, nullptr);
    llama_backend_init();

    if (opts_.max_seqs > llama_max_parallel_sequences()) {
        throw std::runtime_error("at most " + std::to_string(llama_max_parallel_sequences()) + " sequences (llama.cpp's limit), not " +
                                 std::to_string(opts_.max_seqs));
    }

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = opts_.n_gpu_layers < 0 ? 999 : opts_.n_gpu_layers;
    mp.use_extra_bufts = cpu_extra_buffers_safe(opts_.model);  // native/cpu-weights.h
    ggml_backend_dev_t kv_dev = kv_cache_device(mp.n_gpu_layers);
    const DeviceMemory mem_at_start = device_memory(kv_dev);
    model_ = llama_model_load_from_file(opts_.model.c_str(), mp);
    if (!model_) throw std::runtime_error("failed to load model " + opts_.model);
    vocab_ = llama_model_get_vocab(model_);

    // CPU threads. When the model and the vision encoder both compute on the CPU they take turns,
    // each with every thread: the engine thread runs the encoder passes itself, between its steps.
    // Run on a thread of its own, an encoder pass made a second OpenMP team (ggml's CPU backend
    // starts one per calling thread); with more OpenMP threads than cores libgomp stops spinning
    // at barriers, so every later decode step slept at each barrier of its graph. With the model
    // on a GPU, the vision worker's CPU work runs beside the decode loop's, and by default the two
    // split the cores (a quarter, at least one, for vision) so their ggml thread pools never
    // contend for one: oversubscribed, a pool's barrier waits on a descheduled thread.
    const bool on_cpu = !is_gpu_device(kv_dev);  // no layer offloaded: the vision encoder is on the CPU too
    cpu_turns_ = on_cpu && !opts_.mmproj.empty();
    const uint32_t hw = std::max(1u, std::thread::hardware_concurrency());
    const uint32_t base = opts_.n_threads > 0 ? (uint32_t) opts_.n_threads : hw;
    const uint32_t vision_threads = opts_.n_vision_threads > 0 ? (uint32_t) opts_.n_vision_threads
                                    : cpu_turns_           ? base
                                                                 : std::max(1u, base / 4);
    const uint32_t threads = opts_.n_threads > 0 || opts_.mmproj.empty() || cpu_turns_ ? base : std::max(1u, hw - vision_threads);

    // The vision encoder loads before the KV cache is sized: its weights and buffers (allocated by
    // the warm-up) take memory the KV cache cannot have.
    const bool size_by_memory = opts_.n_ctx == 0 && opts_.kv_cache_bytes == 0;
    if (!opts_.mmproj.empty()) {
        const bool vision_on_gpu = opts_.n_gpu_layers != 0;
        const bool ours = opts_.vision_encoder == "caprl";
        mtmd_context_params mparams = mtmd_context_params_default();
        // With our encoder, clip only tokenizes (its image preprocessing runs on the CPU anyway):
        // its weights stay in host memory and it is not warmed up, leaving that GPU memory
        // (about 1.3 GB for CapRL-3B in f16) to the KV cache.
        mparams.use_gpu = vision_on_gpu && !ours;
        mparams.n_threads = (int) vision_threads;
        mparams.print_timings = false;
        mparams.warmup = size_by_memory && !ours;
        mtmd_ = mtmd_init_from_file(opts_.mmproj.c_str(), model_, mparams);
        if (!mtmd_) {
            llama_model_free(model_);
            throw std::runtime_error("failed to load mmproj " + opts_.mmproj);
        }
        // Our batched encoder (issue 8) encodes; mtmd still tokenizes and decodes the embeddings.
        if (ours) {
            try {
                caprl_vision_ = std::make_unique<QwenVisionEncoder>(opts_.mmproj, vision_on_gpu, (int) vision_threads);
                // As clip's warm-up: its compute buffers exist before the free memory is read.
                if (size_by_memory) caprl_vision_->reserve();
            } catch (...) {
                mtmd_free(mtmd_);
                llama_model_free(model_);
                throw;
            }
        }
    }

    // max_seqs 0 (--max-num-seqs not given): as many sequences as the cache holds at their longest,
    // so that each gets a KV stream of its own (the layout below), at least kAutoMinSeqs and at most
    // llama.cpp's limit, 256 (vLLM's default). The cache is planned for the most, then counted.
    const uint32_t seq_limit = (uint32_t) llama_max_parallel_sequences();
    const bool auto_seqs = opts_.max_seqs == 0;
    if (auto_seqs) opts_.max_seqs = seq_limit;
    const uint32_t longest = opts_.max_model_len > 0 ? opts_.max_model_len : (uint32_t) llama_model_n_ctx_train(model_);
    llama_context_params cp = llama_context_default_params();
    // A step decodes every sequence's next token: the batch holds at least max_seqs rows.
    const auto fit_batch_to_seqs = [&] {
        cp.n_seq_max = opts_.max_seqs;
        cp.n_batch = std::max(opts_.n_batch, opts_.max_seqs);
        cp.n_ubatch = std::min<uint32_t>(cp.n_batch, opts_.n_ubatch > 0 ? opts_.n_ubatch : 512);
    };
    fit_batch_to_seqs();
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.kv_unified = true;  // for sizing; the layout is chosen below
    cp.no_perf = true;
    try {
        KvCacheRequest kv;
        kv.tokens = opts_.n_ctx;
        kv.bytes = opts_.kv_cache_bytes;
        kv.memory_fraction = opts_.memory_fraction;
        kv.min_cells = longest;
        kv.max_cells = (uint32_t) std::min<uint64_t>((uint64_t) longest * opts_.max_seqs, UINT32_MAX / 2);
        kv.model_path = opts_.model;
        if (!opts_.mmproj.empty()) {
            std::error_code ec;
            kv.vision_bytes = std::filesystem::file_size(opts_.mmproj, ec);  // counted only in host memory
            if (ec) kv.vision_bytes = 0;
        }
        // Our encoder's own copy of the weights and its buffers; on a GPU the free memory shows them.
        if (caprl_vision_) {
            for (const auto & d : caprl_vision_->memory()) kv.vision_bytes += d.host ? d.weights + d.compute : 0;
        }
        cp.n_ctx = plan_kv_cache(kv, mp, cp, kv_dev, mem_at_start, device_memory(kv_dev), info_.kv_cache);
    } catch (...) {
        if (mtmd_) mtmd_free(mtmd_);
        llama_model_free(model_);
        throw;
    }
    // KV layout. With one pool shared by all sequences (llama.cpp's unified cache) every token of a
    // step attends over every cell in use, masked: decoding 64 sequences cost 5.6x more per step
    // than with a stream per sequence (tiny model on the CPU, 25 vs 4.4 ms). So when the cache holds
    // every sequence at its longest, each sequence gets a stream of its own, as llama-server's slots
    // do; otherwise the pool stays shared (and requests are admitted and preempted against it).
    if (auto_seqs) {
        const uint32_t stream = (longest + 255) / 256 * 256;  // llama.cpp pads a stream to 256 cells
        opts_.max_seqs = std::clamp(cp.n_ctx / std::max(1u, stream), std::min(kAutoMinSeqs, seq_limit), seq_limit);
        fit_batch_to_seqs();
    }
    const bool per_sequence = opts_.max_model_len > 0 && opts_.max_seqs > 1 &&
                              (uint64_t) cp.n_ctx >= (uint64_t) opts_.max_seqs * opts_.max_model_len;
    if (per_sequence) {
        // llama.cpp rounds each stream up to 256 cells: split the pool in whole 256s where that
        // still holds --max-model-len, so the streams never take more than was planned.
        const uint32_t stream = cp.n_ctx / opts_.max_seqs / 256 * 256;
        if (stream >= opts_.max_model_len) cp.n_ctx = stream * opts_.max_seqs;
    }
    cp.kv_unified = !per_sequence;
    info_.kv_cache.layout = per_sequence ? "per-sequence" : "unified";
    ctx_ = llama_init_from_model(model_, cp);
    if (!ctx_) {
        if (mtmd_) mtmd_free(mtmd_);
        llama_model_free(model_);
        throw std::runtime_error("failed to create llama context (KV cache of " + std::to_string(cp.n_ctx) + " tokens)");
    }
    info_.max_model_len = opts_.max_model_len > 0 ? std::min(opts_.max_model_len, llama_n_ctx_seq(ctx_)) : llama_n_ctx_seq(ctx_);
    const ContextBytes live = context_bytes(ctx_, kv_dev);
    info_.kv_cache.tokens = llama_n_ctx(ctx_);
    info_.kv_cache.bytes = live.kv;
    info_.kv_cache.compute_bytes = live.compute;
    if (info_.kv_cache.tokens > 0) info_.kv_cache.bytes_per_token = (double) live.kv / info_.kv_cache.tokens;
    threads_ = threads;
    vision_threads_ = opts_.mmproj.empty() ? 0 : vision_threads;
}

// ---- the threads around the scheduler ----

class Engine::ThreadsIo : public SchedulerIo {
  public:
    ThreadsIo(PromptPrep & prep, VisionWorker * vision) : prep_(prep), vision_(vision) {}
    void prepare(std::vector<PromptJob> && jobs) override { prep_.submit(std::move(jobs)); }
    bool take_prepared(int64_t id, PreparedPrompt & out) override { return prep_.take((uint64_t) id, out); }
    void drop_prepared(int64_t id) override { prep_.drop((uint64_t) id); }
    void encode(std::vector<VisionWorker::Job> && jobs) override { vision_->submit(std::move(jobs)); }
    bool take_encoded(uint64_t key, Embeddings & embd, double & seconds) override {
        bool ok = false;
        if (!vision_->take(key, embd, ok, seconds)) return false;
        if (!ok) embd.reset();
        return true;
    }
    void drop_encoded(uint64_t key) override { vision_->drop(key); }

  private:
    PromptPrep & prep_;
    VisionWorker * vision_;  // null without an mmproj (no image parts then)
};

Engine::Engine(const EngineOptions & opts, EventSink sink) : opts_(opts) {
    load();
    std::unique_ptr<TokenEmbeddings> token_embd;
    if (mtmd_) {
        vision_ = std::make_unique<VisionWorker>(mtmd_, caprl_vision_.get(), llama_model_n_embd_inp(model_), opts_.image_cache_bytes,
                                                 cpu_turns_ ? VisionWorker::Passes::kByEngine : VisionWorker::Passes::kOwnThread,
                                                 [this] { wake_from_worker(); });
        // M-RoPE models (Qwen-VL) attend causally over images, so an image prompt can go in as one
        // run of embedding rows, its text read from the model's token-embedding table.
        if (mtmd_decode_use_mrope(mtmd_)) token_embd = TokenEmbeddings::open(opts_.model, llama_model_n_embd_inp(model_), llama_vocab_n_tokens(vocab_));
    }
    templates_ = common_chat_templates_init(model_, opts_.chat_template);

    const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
    std::vector<llama_token> eog;
    for (llama_token t = 0; t < n_vocab; t++) {
        if (llama_vocab_is_eog(vocab_, t)) eog.push_back(t);
    }
    eog_ = std::make_unique<EogTokens>(std::move(eog), n_vocab);

    info_.chat_template = common_chat_templates_source(templates_.get());
    info_.media_marker = mtmd_default_marker();
    info_.n_ctx = llama_n_ctx(ctx_);
    info_.n_ctx_train = llama_model_n_ctx_train(model_);
    info_.n_vocab = n_vocab;
    info_.has_vision = mtmd_ && mtmd_support_vision(mtmd_);
    info_.image_prompt_rows = token_embd != nullptr;
    if (caprl_vision_) info_.vision_encoder = {"caprl", caprl_vision_->max_patches(), caprl_vision_->memory()};
    info_.max_seqs = opts_.max_seqs;
    info_.threads = {threads_, vision_threads_, cpu_turns_};
    info_.n_layers = llama_model_n_layer(model_) + 1;
    // Layers go to the GPU exactly when the KV cache does (kv_cache_device: a GPU unless none is offloaded).
    info_.n_gpu_layers = info_.kv_cache.on_gpu ? std::min(info_.n_layers, opts_.n_gpu_layers < 0 ? 999 : opts_.n_gpu_layers) : 0;
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const uint64_t total_mem = device_memory(dev).total;
        std::string d = std::string(ggml_backend_dev_name(dev)) + " (" + ggml_backend_dev_description(dev);
        if (total_mem > 0) d += ", " + std::to_string(total_mem >> 20) + " MiB";
        info_.devices.push_back(d + ")");
    }

    // Sampling threads: a draw over Qwen's 151,936 logits takes 0.1-2 ms, once per sequence per
    // step; on a GPU host the decode threads are idle meanwhile, so the draws share them.
    const int32_t sampling_threads = opts_.n_sampling_threads > 0 ? opts_.n_sampling_threads
                                     : n_vocab >= 32768 ? (int32_t) std::min(threads_, 8u) : 1;
    runner_ = std::make_unique<ModelRunner>(ctx_, mtmd_, std::move(token_embd), vocab_, n_vocab, *eog_, sampling_threads, runner_counters_);

    prep_ctx_.vocab = vocab_;
    prep_ctx_.mtmd = mtmd_;
    prep_ctx_.placeholder_images = caprl_vision_ != nullptr;
    prep_ = std::make_unique<PromptPrep>(prep_ctx_, [this] { wake_from_worker(); });
    io_ = std::make_unique<ThreadsIo>(*prep_, vision_.get());

    SchedulerConfig sc;
    sc.max_seqs = opts_.max_seqs;
    sc.kv_cells = info_.n_ctx;
    sc.max_model_len = info_.max_model_len;
    sc.n_batch = (int32_t) llama_n_batch(ctx_);
    sc.n_ubatch = (int32_t) llama_n_ubatch(ctx_);
    sc.per_sequence_kv = info_.kv_cache.layout == "per-sequence";
    sc.image_prompt_rows = info_.image_prompt_rows;
    scheduler_ = std::make_unique<Scheduler>(sc, *io_, sched_counters_);
    output_ = std::make_unique<OutputStage>(vocab_, info_.max_model_len, std::move(sink), generation_tokens_total_);
    thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
    stop();
    output_.reset();
    scheduler_.reset();
    runner_.reset();
    if (mtmd_) mtmd_free(mtmd_);
    templates_.reset();
    if (ctx_) llama_free(ctx_);
    if (model_) llama_model_free(model_);
}

void Engine::wake_from_worker() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        worker_ready_ = true;
    }
    cv_.notify_one();
}

void Engine::submit(Request && req) {
    req.arrived = Clock::now();
    std::lock_guard<std::mutex> lk(mu_);
    submitted_.push_back(std::move(req));
}

// Caller holds mu_.
static void move_all(std::deque<Request> & from, std::deque<Request> & to) {
    while (!from.empty()) {
        to.push_back(std::move(from.front()));
        from.pop_front();
    }
}

void Engine::flush_submitted() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (submitted_.empty()) return;
        move_all(submitted_, inbox_);
    }
    cv_.notify_one();
}

void Engine::cancel(int64_t id) {
    {
        std::lock_guard<std::mutex> lk(mu_);
        move_all(submitted_, inbox_);  // a cancel never overtakes its own request
        cancels_.push_back(id);
    }
    cv_.notify_one();
}

void Engine::stop() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (stopping_ && !thread_.joinable()) return;
        stopping_ = true;
        move_all(submitted_, inbox_);  // ended as aborted with the rest
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
    io_.reset();
    prep_.reset();
    vision_.reset();
}

EngineStats Engine::stats() const {
    EngineStats s;
    s.steps = steps_;
    s.last_batch_seqs = last_batch_seqs_;
    s.max_batch_seqs = max_batch_seqs_;
    s.decoded_seqs_total = decoded_seqs_total_;
    s.running = sched_counters_.running;
    s.waiting = sched_counters_.waiting;
    s.kv_used_cells = sched_counters_.kv_used_cells;
    s.kv_total_cells = info_.n_ctx;
    s.prompt_tokens_total = sched_counters_.prompt_tokens_total;
    s.generation_tokens_total = generation_tokens_total_;
    s.preemptions = sched_counters_.preemptions;
    s.stream_moves = sched_counters_.stream_moves;
    s.image_cache_hits = vision_ ? vision_->cache_hits() : 0;
    s.image_cache_misses = vision_ ? vision_->cache_misses() : 0;
    for (size_t k = 0; k < s.step_tokens.size(); k++) s.step_tokens[k] = step_tokens_[k];
    s.step_tokens_sum = step_tokens_sum_;
    s.busy_seconds = busy_ns_ * 1e-9;
    s.model_seconds = runner_counters_.model_ns * 1e-9;
    s.sample_seconds = runner_counters_.sample_ns * 1e-9;
    s.cpu_wait_seconds = cpu_wait_ns_ * 1e-9;
    return s;
}

std::vector<llama_token> Engine::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    return caprl::tokenize(vocab_, text, add_special, parse_special);
}

PreparedPrompt Engine::tokenize_prompt(const std::string & prompt, std::vector<ImagePtr> && images, bool add_special) const {
    return prepare_prompt(prep_ctx_, prompt, std::move(images), add_special, true);
}

std::string Engine::detokenize(const std::vector<llama_token> & tokens) const {
    std::string out(tokens.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(vocab_, tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(), false, false);
    if (n < 0) {
        out.resize(-n);
        n = llama_detokenize(vocab_, tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(), false, false);
    }
    out.resize(std::max(n, 0));
    return out;
}

std::string Engine::apply_chat_template(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const {
    common_chat_templates_inputs in;
    in.use_jinja = true;
    in.add_generation_prompt = add_generation_prompt;
    for (const auto & m : messages) {
        common_chat_msg msg;
        msg.role = m.role;
        msg.content = m.content;
        in.messages.push_back(std::move(msg));
    }
    return common_chat_templates_apply(templates_.get(), in).prompt;
}

// ---- engine thread ----

void Engine::loop() {
    bool idle = true;
    for (;;) {
        {
            std::unique_lock<std::mutex> lk(mu_);
            if (stopping_) break;
            if (idle) {
                // Nothing to decode: sleep until a request, a cancel, an encoded image or a prepared prompt arrives.
                cv_.wait(lk, [&] { return stopping_ || !inbox_.empty() || !cancels_.empty() || worker_ready_; });
                worker_ready_ = false;
                if (stopping_) break;
            }
        }
        const StepOutcome done = step();
        // On a shared CPU every queued image is encoded before the next step (as llama-server
        // does): a burst's requests then start decoding together, instead of the first ones being
        // stalled, step after step, by the encoder passes of those behind them.
        bool encoded = false;
        while (run_vision_pass(done.decoded)) encoded = true;
        idle = !encoded && !done.progress;
    }
    // Shutting down: everything live ends as aborted.
    take_inbox();
    scheduler_->cancel_all();
    output_->collect(*scheduler_);
    output_->emit();
}

void Engine::take_inbox() {
    std::deque<Request> requests;
    std::vector<int64_t> cancels;
    {
        std::lock_guard<std::mutex> lk(mu_);
        move_all(inbox_, requests);
        cancels.swap(cancels_);
    }
    for (auto & req : requests) scheduler_->add(std::move(req));
    for (int64_t id : cancels) scheduler_->cancel(id);
}

Engine::StepOutcome Engine::step() {
    const auto started = Clock::now();
    take_inbox();
    output_->collect(*scheduler_);  // what ended outside a step (cancels, refusals): its cells freed next
    StepPlan plan = scheduler_->schedule();
    const bool had_running = sched_counters_.running > 0;
    StepResult result = runner_->execute(plan);
    scheduler_->update(plan, result);
    output_->accept(result);
    output_->collect(*scheduler_);
    count_step(plan, result);
    const bool emitted = output_->emit();
    if (had_running) busy_ns_ += ns_between(started, Clock::now());
    return {emitted || !plan.idle() || plan.progress, !plan.idle()};
}

void Engine::count_step(const StepPlan & plan, const StepResult & result) {
    uint32_t tokens = 0;
    for (size_t i = 0; i < plan.rows.size(); i++) tokens += result.rows_rc[i] == 0 ? (uint32_t) plan.rows[i].rows : 0;
    if (!plan.batch.empty() && result.batch_rc == 0) {
        steps_++;
        for (const BatchRows & b : plan.batch) tokens += b.decode ? 1 : (uint32_t) (b.to.cells - b.from.cells);
        last_batch_seqs_ = plan.decoding;
        decoded_seqs_total_ += plan.decoding;
        if (plan.decoding > max_batch_seqs_) max_batch_seqs_ = plan.decoding;
    }
    if (tokens == 0) return;
    // One engine step's tokens into the step_tokens histogram.
    size_t k = 0;
    while (k + 1 < step_tokens_.size() && (uint64_t{1} << k) < tokens) k++;
    step_tokens_[k]++;
    step_tokens_sum_ += tokens;
}

bool Engine::run_vision_pass(bool steps_waiting) {
    if (!cpu_turns_ || !vision_ || !vision_->queued()) return false;
    const auto started = Clock::now();
    vision_->run_pass();
    // The decoding that waited for this pass (none when the last step only waited on images).
    if (steps_waiting) {
        const uint64_t ns = ns_between(started, Clock::now());
        cpu_wait_ns_ += ns;
        busy_ns_ += ns;
    }
    return true;
}

}  // namespace caprl
