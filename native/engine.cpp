#include "engine.h"

#include "cpu-weights.h"

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

// The fewest sequences max_seqs 0 gives (the old fixed default): a cache too small to give each
// of them a stream at --max-model-len is shared by them, admitted and preempted against.
constexpr uint32_t kAutoMinSeqs = 16;

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

double seconds_between(Clock::time_point from, Clock::time_point to) {
    return std::chrono::duration<double>(to - from).count();
}

// For the engine's time counters (atomic integers).
uint64_t ns_between(Clock::time_point from, Clock::time_point to) {
    return (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(to - from).count();
}

}  // namespace

int32_t PromptPart::n_cells() const {
    return media ? (int32_t) mtmd_input_chunk_get_n_tokens(media) : (int32_t) tokens.size();
}

Engine::Engine(const EngineOptions & opts, EventSink sink) : opts_(opts), sink_(std::move(sink)) {
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
    opts_.n_batch = llama_n_batch(ctx_);
    max_model_len_ = opts_.max_model_len > 0 ? std::min(opts_.max_model_len, llama_n_ctx_seq(ctx_)) : llama_n_ctx_seq(ctx_);
    const ContextBytes live = context_bytes(ctx_, kv_dev);
    info_.kv_cache.tokens = llama_n_ctx(ctx_);
    info_.kv_cache.bytes = live.kv;
    info_.kv_cache.compute_bytes = live.compute;
    if (info_.kv_cache.tokens > 0) info_.kv_cache.bytes_per_token = (double) live.kv / info_.kv_cache.tokens;

    if (mtmd_) {
        vision_ = std::make_unique<VisionWorker>(mtmd_, caprl_vision_.get(), llama_model_n_embd_inp(model_), opts_.image_cache_bytes,
                                                 cpu_turns_ ? VisionWorker::Passes::kByEngine : VisionWorker::Passes::kOwnThread,
                                                 [this] { wake_from_worker(); });
        // M-RoPE models (Qwen-VL) attend causally over images, so an image prompt can go in as one
        // run of embedding rows, its text read from the model's token-embedding table.
        if (mtmd_decode_use_mrope(mtmd_)) token_embd_ = TokenEmbeddings::open(opts_.model, llama_model_n_embd_inp(model_), llama_vocab_n_tokens(vocab_));
    }

    templates_ = common_chat_templates_init(model_, opts_.chat_template);

    const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
    std::vector<llama_token> eog;
    for (llama_token t = 0; t < n_vocab; t++) {
        if (llama_vocab_is_eog(vocab_, t)) eog.push_back(t);
    }
    eog_ = std::make_unique<EogTokens>(std::move(eog), n_vocab);

    // Sampling threads: a draw over Qwen's 151,936 logits takes 0.1-2 ms, once per sequence per
    // step; on a GPU host the decode threads are idle meanwhile, so the draws share them.
    const int32_t sampling_threads = opts_.n_sampling_threads > 0 ? opts_.n_sampling_threads
                                     : n_vocab >= 32768 ? (int32_t) std::min(threads, 8u) : 1;
    sampling_ = std::make_unique<ParallelFor>(sampling_threads);

    info_.chat_template = common_chat_templates_source(templates_.get());
    info_.media_marker = mtmd_default_marker();
    info_.n_ctx = llama_n_ctx(ctx_);
    info_.n_ctx_train = llama_model_n_ctx_train(model_);
    info_.n_vocab = n_vocab;
    info_.has_vision = mtmd_ && mtmd_support_vision(mtmd_);
    info_.image_prompt_rows = token_embd_ != nullptr;
    if (caprl_vision_) info_.vision_encoder = {"caprl", caprl_vision_->max_patches(), caprl_vision_->memory()};
    info_.max_seqs = opts_.max_seqs;
    info_.threads = {threads, opts_.mmproj.empty() ? 0 : vision_threads, cpu_turns_};
    info_.n_layers = llama_model_n_layer(model_) + 1;
    // Layers go to the GPU exactly when the KV cache does (kv_cache_device: a GPU unless none is offloaded).
    info_.n_gpu_layers = is_gpu_device(kv_dev) ? std::min(info_.n_layers, mp.n_gpu_layers) : 0;
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const uint64_t total_mem = device_memory(dev).total;
        std::string d = std::string(ggml_backend_dev_name(dev)) + " (" + ggml_backend_dev_description(dev);
        if (total_mem > 0) d += ", " + std::to_string(total_mem >> 20) + " MiB";
        info_.devices.push_back(d + ")");
    }

    batch_ = llama_batch_init((int32_t) opts_.n_batch, 0, 1);
    for (int32_t i = 0; i < (int32_t) opts_.max_seqs; i++) free_seq_ids_.insert(i);

    prep_ = std::make_unique<PromptPrep>(
        [this](const std::string & prompt, std::vector<ImagePtr> && images) { return prepare(prompt, std::move(images)); },
        [this] { wake_from_worker(); });
    thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
    stop();
    llama_batch_free(batch_);
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
    prep_.reset();
    vision_.reset();
}

EngineStats Engine::stats() const {
    EngineStats s;
    s.steps = steps_;
    s.last_batch_seqs = last_batch_seqs_;
    s.max_batch_seqs = max_batch_seqs_;
    s.decoded_seqs_total = decoded_seqs_total_;
    s.running = n_running_;
    s.waiting = n_waiting_;
    s.kv_used_cells = kv_used_;
    s.kv_total_cells = info_.n_ctx;
    s.prompt_tokens_total = prompt_tokens_total_;
    s.generation_tokens_total = generation_tokens_total_;
    s.preemptions = preemptions_;
    s.stream_moves = stream_moves_;
    s.image_cache_hits = vision_ ? vision_->cache_hits() : 0;
    s.image_cache_misses = vision_ ? vision_->cache_misses() : 0;
    for (size_t k = 0; k < s.step_tokens.size(); k++) s.step_tokens[k] = step_tokens_[k];
    s.step_tokens_sum = step_tokens_sum_;
    s.busy_seconds = busy_ns_ * 1e-9;
    s.model_seconds = model_ns_ * 1e-9;
    s.sample_seconds = sample_ns_ * 1e-9;
    s.cpu_wait_seconds = cpu_wait_ns_ * 1e-9;
    return s;
}

std::vector<llama_token> Engine::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    int32_t n = -llama_tokenize(vocab_, text.data(), (int32_t) text.size(), nullptr, 0, add_special, parse_special);
    std::vector<llama_token> out(std::max(n, 0));
    n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special, parse_special);
    out.resize(std::max(n, 0));
    return out;
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

void Engine::end_unadmitted(const Request & req, const std::string & reason, int32_t prompt_tokens, const std::string & error) {
    for (int32_t k = 0; k < std::max(req.n, 1); k++) {
        Event ev;
        ev.id = req.id;
        ev.index = k;
        ev.finish = Finish{reason, prompt_tokens, 0, error};
        out_.push_back(std::move(ev));
    }
}

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
        const bool progress = step();
        // On a shared CPU every queued image is encoded before the next step (as llama-server
        // does): a burst's requests then start decoding together, instead of the first ones being
        // stalled, step after step, by the encoder passes of those behind them.
        bool encoded = false;
        while (run_vision_pass(progress)) encoded = true;
        idle = !encoded && !progress;
    }
    // Shutting down: everything live ends as aborted.
    take_inbox();
    for (auto & seq : running_) finish(seq, "abort");
    while (!waiting_.empty()) {
        forget_prepared(waiting_.front().id);
        end_unadmitted(waiting_.front(), "abort");
        waiting_.pop_front();
    }
    release_finished();
    emit(std::move(out_));
}

void Engine::take_inbox() {
    std::vector<int64_t> cancels;
    {
        std::lock_guard<std::mutex> lk(mu_);
        move_all(inbox_, waiting_);
        cancels.swap(cancels_);
    }
    if (cancels.empty()) return;
    std::unordered_set<int64_t> ids(cancels.begin(), cancels.end());
    for (auto & seq : running_) {
        if (!seq.finished && ids.count(seq.req.id)) finish(seq, "abort");
    }
    for (auto it = waiting_.begin(); it != waiting_.end();) {
        if (ids.count(it->id)) {
            forget_prepared(it->id);
            end_unadmitted(*it, "abort");
            it = waiting_.erase(it);
        } else {
            ++it;
        }
    }
}

// Runs on the prompt-prep thread: reads only what is fixed after construction (vocab, mtmd, limits).
PreparedPrompt Engine::prepare(const std::string & prompt, std::vector<ImagePtr> && images) const {
    PreparedPrompt out;
    out.images = std::move(images);
    const auto fail = [&](const std::string & why) {
        out.error = why;
        return std::move(out);
    };
    if (!out.images.empty() && !mtmd_) {
        return fail("this model has no vision encoder (start the server with --mmproj) and cannot take images");
    }
    if (!mtmd_) {
        PromptPart p;
        p.tokens = tokenize(prompt, true, true);
        out.parts.push_back(std::move(p));
    } else {
        std::vector<mtmd::bitmap> bitmaps;
        std::vector<const mtmd_bitmap *> ptrs;
        for (const ImagePtr & ptr : out.images) {
            const Image & img = *ptr;
            if (img.rgb.size() != (size_t) img.width * img.height * 3 || img.width == 0 || img.height == 0) {
                return fail("image buffer does not match its size");
            }
            // Our encoder preprocesses the pixels itself: mtmd gets a placeholder of the image's
            // size, from which it plans the same tokens and grid without resizing and normalizing
            // the pixels into a float copy (20-30 ms and 13 MB for a 1036x1036 image).
            bitmaps.emplace_back(img.width, img.height, caprl_vision_ ? nullptr : img.rgb.data());
            // The id keys the image-embedding cache: pixels and size (preprocessing is fixed per mmproj).
            const size_t h = std::hash<std::string_view>{}(std::string_view((const char *) img.rgb.data(), img.rgb.size()));
            const std::string id = std::to_string(img.width) + "x" + std::to_string(img.height) + ":" + std::to_string(h);
            mtmd_bitmap_set_id(bitmaps.back().ptr.get(), id.c_str());
            ptrs.push_back(bitmaps.back().ptr.get());
        }
        // Counted here: mtmd_tokenize reports a mismatch only as a failure (2), like a bad image.
        const std::string marker = mtmd_default_marker();
        size_t markers = 0;
        for (size_t at = prompt.find(marker); at != std::string::npos; at = prompt.find(marker, at + marker.size())) markers++;
        if (markers != out.images.size()) {
            return fail("the prompt has a different number of image markers (" + std::to_string(markers) + ") than images (" +
                        std::to_string(out.images.size()) + " images)");
        }
        out.chunks = SharedChunks(mtmd_input_chunks_init(), mtmd_input_chunks_free);
        mtmd_input_text text{prompt.c_str(), prompt.size(), true, true};
        const int32_t rc = mtmd_tokenize(mtmd_, out.chunks.get(), &text, ptrs.data(), ptrs.size());
        if (rc != 0) return fail("image preprocessing failed");
        const size_t n = mtmd_input_chunks_size(out.chunks.get());
        for (size_t i = 0; i < n; i++) {
            const mtmd_input_chunk * c = mtmd_input_chunks_get(out.chunks.get(), i);
            PromptPart p;
            if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
                size_t nt = 0;
                const llama_token * toks = mtmd_input_chunk_get_tokens_text(c, &nt);
                p.tokens.assign(toks, toks + nt);
                if (p.tokens.empty()) continue;
            } else {
                p.media = c;
            }
            out.parts.push_back(std::move(p));
        }
    }
    for (const auto & p : out.parts) out.prompt_cells += p.n_cells();
    if (out.prompt_cells == 0) return fail("the prompt is empty");
    if (out.parts.back().media) return fail("the prompt must not end with an image");
    if ((uint32_t) out.prompt_cells >= max_model_len_) {
        return fail("This model's maximum context length is " + std::to_string(max_model_len_) +
                    " tokens. However, your prompt has " + std::to_string(out.prompt_cells) + " tokens.");
    }
    return out;
}

void Engine::prepare_ahead() {
    // The next requests in line (as many as could be admitted at once) are prepared ahead; the
    // rest wait unprepared, so prepared images held in memory stay bounded. They are handed over
    // in one call, so the prep thread reports them ready together.
    std::vector<PromptJob> jobs;
    size_t k = 0;
    for (auto & req : waiting_) {
        if (k++ >= opts_.max_seqs) break;
        if (!prep_sent_.insert(req.id).second) continue;
        jobs.push_back(PromptJob{(uint64_t) req.id, req.prompt, std::move(req.images)});
    }
    if (!jobs.empty()) prep_->submit(std::move(jobs));
}

void Engine::forget_prepared(int64_t id) {
    if (prep_sent_.erase(id)) prep_->drop(id);
    auto it = prepared_.find(id);
    if (it == prepared_.end()) return;
    for (const auto & part : it->second.parts) {
        if (part.vision_key) vision_->drop(part.vision_key);
    }
    prepared_.erase(it);
}

PreparedPrompt * Engine::prepared_prompt(int64_t id) {
    auto it = prepared_.find(id);
    if (it != prepared_.end()) return &it->second;
    PreparedPrompt p;
    if (!prep_->take(id, p)) return nullptr;
    // It stays in prep_sent_ until it leaves waiting_: while it waits for KV cells,
    // prepare_ahead must not hand it to the prep thread again (its images are gone).
    return &prepared_.emplace(id, std::move(p)).first->second;
}

void Engine::encode_waiting() {
    // Requests waiting for a sequence slot or KV room (the prepared ones, at most --max-num-seqs
    // ahead) have their images encoded meanwhile, beside the decoding, in line order: admitted,
    // they prefill at once. Their embeddings wait for them in the vision worker.
    if (!vision_) return;
    size_t k = 0;
    for (const auto & req : waiting_) {
        if (k++ >= opts_.max_seqs) break;
        PreparedPrompt * p = prepared_prompt(req.id);
        if (!p || !p->error.empty() || p->images_queued) continue;
        queue_images(p->parts, p->chunks, p->images);
        p->images_queued = true;
    }
}

void Engine::admit() {
    while (!waiting_.empty()) {
        const int32_t n = waiting_.front().n;
        if (n < 1 || (uint32_t) n > opts_.max_seqs) {
            forget_prepared(waiting_.front().id);
            end_unadmitted(waiting_.front(), "error", 0,
                           "n must be between 1 and " + std::to_string(opts_.max_seqs) + " (the number of sequences, --max-num-seqs)");
            waiting_.pop_front();
            continue;
        }
        const int64_t id = waiting_.front().id;
        PreparedPrompt * ready = prepared_prompt(id);
        if (!ready) break;  // still being prepared: admission stays in order
        const int32_t prompt_cells = ready->prompt_cells;
        int64_t out_cells = std::min<int64_t>(std::max(waiting_.front().sampling.max_tokens, 1), (int64_t) max_model_len_ - prompt_cells);
        if (ready->error.empty() && n > 1 && prompt_cells + n * out_cells > (int64_t) info_.n_ctx) {
            // The n choices at max_tokens would not fit the pool even alone. Each stops ("length")
            // where its share of the pool ends; running the pool out mid-step instead would fail
            // every sequence of that step, other requests' too.
            out_cells = ((int64_t) info_.n_ctx - prompt_cells) / n;
            if (out_cells < 1) {
                ready->error = std::to_string(n) + " choices of this " + std::to_string(prompt_cells) +
                                      "-token prompt do not fit the KV cache (" + std::to_string(info_.n_ctx) + " tokens): lower n";
            } else {
                waiting_.front().sampling.max_tokens = (int32_t) out_cells;
            }
        }
        if (!ready->error.empty()) {
            end_unadmitted(waiting_.front(), "error", ready->prompt_cells, ready->error);
            prep_sent_.erase(id);
            prepared_.erase(id);
            waiting_.pop_front();
            continue;
        }
        // A bad request at the head has been answered above, even with every slot busy; a good one
        // waits for its slots, and preempted sequences resume before anything new starts.
        if (free_seq_ids_.size() < (size_t) n) break;
        if (std::any_of(running_.begin(), running_.end(), [](const Sequence & q) { return q.preempted; })) break;
        Sequence seq;
        seq.prompt_cells = prompt_cells;
        // n = 1 needs room for its prompt and a first token; n > 1 reserves the shared prompt plus
        // every choice's whole output.
        const int64_t want = n == 1 ? seq.prompt_cells + 1 : seq.prompt_cells + n * out_cells;
        if (cells_committed(true) + want + growth_watermark() > (int64_t) info_.n_ctx) break;  // not enough free cells yet
        seq.req = std::move(waiting_.front());
        waiting_.pop_front();
        seq.chunks = std::move(ready->chunks);
        seq.parts = std::move(ready->parts);
        seq.req.images = std::move(ready->images);
        prep_sent_.erase(id);
        prepared_.erase(id);
        seq.orig_parts = seq.parts.size();
        if (n > 1) {
            // Choices 1..n-1 each hold an equal share of the output cells; choice 0 holds the rest.
            seq.pinned = true;
            seq.choice_reserved_cells = (int32_t) ((want - seq.prompt_cells) / n);
            seq.reserved_cells = (int32_t) (want - (int64_t) (n - 1) * seq.choice_reserved_cells);
            reserved_cells_ += want;
        }
        seq.seq_id = take_seq_id();
        for (int32_t k = 1; k < n; k++) seq.choice_seq_ids.push_back(take_seq_id());
        seq.sampler = std::make_unique<Sampler>(vocab_, info_.n_vocab, seq.req.sampling, *eog_);
        seq.text = std::make_unique<TextStream>(seq.req.sampling.stop);
        seq.pending.id = seq.req.id;
        seq.admitted = Clock::now();
        prompt_tokens_total_ += seq.prompt_cells;
        submit_images(seq);
        running_.push_back(std::move(seq));
    }
}

void Engine::submit_images(Sequence & seq) { queue_images(seq.parts, seq.chunks, seq.req.images); }

void Engine::queue_images(std::vector<PromptPart> & parts, const SharedChunks & chunks, const std::vector<ImagePtr> & images) {
    // Encode every image not handed over yet (one queued while its request waited is), off this
    // thread; decoding goes on meanwhile. The k-th image part is the request's k-th image (our
    // encoder preprocesses the pixels itself).
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

void Engine::submit_queued_images() {
    if (!vision_jobs_.empty()) vision_->submit(std::move(vision_jobs_));
    vision_jobs_.clear();
}

int64_t Engine::growth_watermark() const {
    // Cells kept free for running sequences to grow into before starting (or resuming) a prompt,
    // so that preemption does not thrash: 32 tokens per unpinned running sequence, at most 1/4 of the pool.
    int64_t running = 0;
    for (const auto & seq : running_) running += !seq.pinned && !seq.finished;
    return std::min<int64_t>(running * 32, info_.n_ctx / 4);
}

int64_t Engine::cells_committed(bool with_prefill) const {
    int64_t cells = reserved_cells_;
    for (const auto & seq : running_) {
        if (seq.pinned || seq.finished) continue;
        cells += seq.n_cells + (with_prefill ? seq.prefill_left() : 0);
    }
    return cells;
}

void Engine::make_room() {
    for (;;) {
        int64_t need = cells_committed(false);
        for (const auto & seq : running_) {
            if (!seq.pinned && !seq.finished && !seq.prefilling()) need++;
        }
        if (need <= (int64_t) info_.n_ctx) return;
        // The youngest unpinned sequence holding cells gives them back.
        Sequence * victim = nullptr;
        for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
            if (!it->pinned && !it->finished && it->n_cells > 0) {
                victim = &*it;
                break;
            }
        }
        if (!victim) return;
        preempt(*victim);
    }
}

// With a KV stream per sequence llama.cpp cuts a batch into ubatches of consecutive sequence ids
// (the ubatch's streams are one slice of the cache), and each ubatch is one pass over the weights.
// Finished sequences leave holes, so the decoding ones are kept on ids 0..d-1: the highest moves
// into a hole, its stream copied (the whole stream, at the next llama_decode: 66 MB for CapRL-3B
// at 1792 cells, well under a millisecond on a GPU, against a pass over 6 GB of weights per extra
// ubatch). New sequences take the lowest free id, at or above d, so a request moves about once.
void Engine::pack_decoding_streams() {
    if (info_.kv_cache.layout != "per-sequence") return;
    std::vector<Sequence *> movers;
    std::vector<bool> decoder_at;
    size_t d = 0;
    for (const auto & seq : running_) d += !seq.finished && !seq.prefilling();
    decoder_at.assign(d, false);
    for (auto & seq : running_) {
        if (seq.finished || seq.prefilling()) continue;
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
        if (!free_seq_ids_.count(hole) && !vacate_seq_id(hole, (llama_seq_id) d)) continue;  // the gap stays
        move_sequence(*movers[m++], hole);
    }
}

bool Engine::vacate_seq_id(llama_seq_id id, llama_seq_id above) {
    const auto to = free_seq_ids_.lower_bound(above);
    if (to == free_seq_ids_.end()) return false;
    for (auto & seq : running_) {
        if (seq.finished) continue;
        if (seq.seq_id == id) {
            move_sequence(seq, *to);
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

void Engine::move_sequence(Sequence & seq, llama_seq_id to) {
    llama_memory_t mem = llama_get_memory(ctx_);
    if (llama_memory_seq_pos_max(mem, seq.seq_id) >= 0) {
        llama_memory_seq_cp(mem, seq.seq_id, to, -1, -1);
        llama_memory_seq_rm(mem, seq.seq_id, -1, -1);
        stream_moves_++;
    }
    free_seq_ids_.erase(to);
    free_seq_ids_.insert(seq.seq_id);
    seq.seq_id = to;
}

bool Engine::may_start_resume(const Sequence & seq, int64_t free_cells) const {
    // A preempted sequence starts again only when all of it fits with room to grow, whether or not
    // it had generated tokens (one preempted in its prompt would otherwise fill the pool again at
    // once and be preempted again, and again, while the others grow).
    const bool not_started = seq.preempted && seq.part == 0 && seq.part_off == 0 && seq.n_cells == 0;
    if (!not_started) return true;
    // Alone in the pool it always fits (its length is bounded by max_model_len <= the pool).
    const bool alone = std::none_of(running_.begin(), running_.end(), [&](const Sequence & q) {
        return &q != &seq && !q.finished && (q.n_cells > 0 || q.pinned);
    });
    return alone || free_cells >= seq.prefill_left() + growth_watermark();
}

void Engine::preempt(Sequence & seq) {
    llama_memory_seq_rm(llama_get_memory(ctx_), seq.seq_id, -1, -1);
    for (auto & part : seq.parts) {
        if (part.vision_key) vision_->drop(part.vision_key);
        part.vision_key = 0;
        part.embd.reset();
        part.rows_done = 0;
    }
    // Later: prefill the prompt and every generated token again; its last logits continue the output.
    seq.parts.resize(seq.orig_parts);
    if (!seq.generated.empty()) {
        PromptPart resume;
        resume.tokens = seq.generated;
        seq.parts.push_back(std::move(resume));
    }
    seq.resume_pending = !seq.generated.empty();
    seq.preempted = true;
    seq.part = 0;
    seq.part_off = 0;
    seq.n_past = 0;
    seq.n_cells = 0;
    seq.batch_row = -1;
    submit_images(seq);
    preemptions_++;
}

bool Engine::prompt_as_rows(const Sequence & seq) const {
    return token_embd_ && std::any_of(seq.parts.begin(), seq.parts.end(), [](const PromptPart & p) { return p.media != nullptr; });
}

int32_t Engine::take_encoded_images(Sequence & seq, bool all) {
    bool waiting = false;
    for (size_t i = seq.part; i < seq.parts.size(); i++) {
        PromptPart & part = seq.parts[i];
        if (part.vision_key) {
            bool ok = false;
            double encode_seconds = 0;
            if (!vision_->take(part.vision_key, part.embd, ok, encode_seconds)) {
                waiting = true;
            } else {
                part.vision_key = 0;
                part.rows_done = 0;
                seq.image_encode_seconds += encode_seconds;
                if (!ok) {
                    finish(seq, "error", "the vision encoder failed on this image");
                    return 0;
                }
            }
        }
        if (!all) break;
    }
    return waiting ? -1 : 1;
}

int32_t Engine::prefill_rows(Sequence & seq, int32_t max_rows, bool with_text) {
    const int32_t ready = take_encoded_images(seq, with_text);
    if (ready <= 0) return ready;
    // A model that attends within an image both ways (mtmd says which) takes it in one piece.
    const PromptPart & current = seq.parts[seq.part];
    const bool whole = !with_text && current.media && mtmd_decode_use_non_causal(mtmd_, current.media);
    // The rows: from the current part on, up to max_rows; without text, the current image only.
    struct Segment {
        size_t part;
        int32_t first;
        int32_t n;
    };
    std::vector<Segment> segs;
    int32_t total = 0;
    for (size_t i = seq.part; i < seq.parts.size() && total < max_rows; i++) {
        const PromptPart & p = seq.parts[i];
        if (!p.media && !with_text) break;
        const int32_t done = i == seq.part ? (p.media ? p.rows_done : (int32_t) seq.part_off) : 0;
        const int32_t k = whole ? p.n_cells() - done : std::min(max_rows - total, p.n_cells() - done);
        if (k > 0) segs.push_back({i, done, k});
        total += k;
        if (!with_text) break;
    }
    if (total <= 0) return 0;

    // Embeddings: one image's rows are passed in place; a mix (text and image, or two images) is
    // gathered into one buffer. Positions, for M-RoPE by section (all t, then y, x, z) as
    // llama_batch takes them: an image's rows keep the positions they have in one piece, text rows
    // the same position in every section (as llama.cpp gives a token batch).
    const int32_t n_embd = llama_model_n_embd_inp(model_);
    const bool mrope = mtmd_decode_use_mrope(mtmd_);
    const bool in_place = segs.size() == 1 && seq.parts[segs[0].part].media;
    if (!in_place) rows_buf_.resize((size_t) total * n_embd);
    std::vector<llama_pos> pos((size_t) total * (mrope ? 4 : 1));
    const auto set_pos = [&](int32_t r, llama_pos t, llama_pos y, llama_pos x, llama_pos z) {
        pos[r] = t;
        if (!mrope) return;
        pos[r + total] = y;
        pos[r + 2 * total] = x;
        pos[r + 3 * total] = z;
    };
    llama_pos n_past = seq.n_past;
    int32_t r = 0;
    for (const Segment & sg : segs) {
        const PromptPart & p = seq.parts[sg.part];
        if (p.media) {
            if (!in_place) memcpy(rows_buf_.data() + (size_t) r * n_embd, p.embd->data() + (size_t) sg.first * n_embd, (size_t) sg.n * n_embd * sizeof(float));
            const mtmd_image_tokens * image = mtmd_input_chunk_get_tokens_image(p.media);
            for (int32_t i = 0; i < sg.n; i++, r++) {
                if (mrope && image) {
                    const mtmd_decoder_pos d = mtmd_image_tokens_get_decoder_pos(image, n_past, (size_t) (sg.first + i));
                    set_pos(r, (llama_pos) d.t, (llama_pos) d.y, (llama_pos) d.x, (llama_pos) d.z);
                } else {
                    set_pos(r, n_past + sg.first + i, 0, 0, 0);
                }
            }
            // M-RoPE: what follows an image continues at its start + max(rows, cols), not + cells.
            if (sg.first + sg.n == p.n_cells()) n_past += mtmd_input_chunk_get_n_pos(p.media);
        } else {
            if (!token_embd_->rows(p.tokens.data() + sg.first, sg.n, rows_buf_.data() + (size_t) r * n_embd)) {
                finish(seq, "error", "reading the token embeddings failed");
                return 0;
            }
            for (int32_t i = 0; i < sg.n; i++, r++) set_pos(r, n_past + i, n_past + i, n_past + i, n_past + i);
            n_past += sg.n;
        }
    }

    std::vector<int32_t> n_seq_id(total, 1);
    llama_seq_id sid = seq.seq_id;
    std::vector<llama_seq_id *> seq_ids(total, &sid);
    std::vector<int8_t> logits(total, 0);
    llama_batch batch{};
    batch.n_tokens = total;
    batch.embd = in_place ? const_cast<float *>(seq.parts[segs[0].part].embd->data()) + (size_t) segs[0].first * n_embd : rows_buf_.data();
    batch.pos = pos.data();
    batch.n_seq_id = n_seq_id.data();
    batch.seq_id = seq_ids.data();
    batch.logits = logits.data();
    const auto started = Clock::now();
    if (whole) llama_set_causal_attn(ctx_, false);
    const int32_t rc = llama_decode(ctx_, batch);
    if (whole) llama_set_causal_attn(ctx_, true);
    model_ns_ += ns_between(started, Clock::now());
    if (rc != 0) {
        finish(seq, "error", "decoding the prompt's embedding rows failed");
        return 0;
    }

    for (const Segment & sg : segs) {
        PromptPart & p = seq.parts[sg.part];
        seq.n_cells += sg.n;
        if (p.media) {
            p.rows_done += sg.n;
            if (p.rows_done < p.n_cells()) break;
            seq.n_past += mtmd_input_chunk_get_n_pos(p.media);
            p.embd.reset();
        } else {
            seq.part_off += sg.n;
            seq.n_past += sg.n;
            if (seq.part_off < p.tokens.size()) break;
        }
        seq.part++;
        seq.part_off = 0;
    }
    return total;
}

bool Engine::step() {
    take_inbox();
    release_finished();
    prepare_ahead();
    admit();
    prepare_ahead();
    encode_waiting();
    submit_queued_images();  // admitted this step, and waiting: one hand-over, one encoder pass
    n_running_ = (uint32_t) running_.size();
    n_waiting_ = (uint32_t) waiting_.size();
    if (running_.empty()) {
        emit(std::move(out_));
        return false;
    }
    const auto step_started = Clock::now();

    make_room();
    submit_queued_images();  // preempted this step
    pack_decoding_streams();
    // Cells unpinned prompts may take this step, after every decoding sequence's next token.
    int64_t free_cells = (int64_t) info_.n_ctx - cells_committed(false);
    for (const auto & seq : running_) {
        if (!seq.pinned && !seq.finished && !seq.prefilling()) free_cells--;
    }

    // The step's budget (--max-num-batched-tokens): every decoding sequence's next token first,
    // then prompts, oldest request first: embedding rows (an image prompt's, or an image's) in
    // llama_decode calls of their own, text into the batch below. Rows larger than what is left
    // go in over several steps, in whole ubatches, so they meet the same ubatches as in one piece;
    // when nothing else went in, a prompt advances by one ubatch over the budget.
    bool progress = !out_.empty();
    uint32_t step_tokens = 0;  // embedding rows decoded this step (then batch tokens too)
    int32_t budget = (int32_t) opts_.n_batch;
    // The batch: `take` is a sequence's prompt tokens this step; -1: its next token.
    struct Rows {
        Sequence * seq;
        int32_t take;
    };
    std::vector<Rows> rows;
    uint32_t decoding = 0;
    for (auto & seq : running_) {
        seq.batch_row = -1;
        if (seq.finished || seq.prefilling()) continue;
        rows.push_back({&seq, -1});
        decoding++;
        budget--;
    }
    int32_t planned = 0;  // prompt tokens put in the batch so far
    const int32_t ubatch = (int32_t) llama_n_ubatch(ctx_);
    // Of n prompt cells, what a sequence may take now: an unpinned one only free cells, and none
    // while it waits to resume after a preemption.
    const auto room_for = [&](const Sequence & seq, int32_t n) -> int32_t {
        if (seq.pinned) return n;
        if (!may_start_resume(seq, free_cells)) return 0;
        return (int32_t) std::min<int64_t>(n, std::max<int64_t>(free_cells, 0));
    };
    for (auto & seq : running_) {
        if (seq.finished || !seq.prefilling()) continue;
        // An image prompt, with the token-embedding table: all of it but its last token, as
        // embedding rows, once its images are encoded (its last token goes in the batch, whose
        // logits give the first output). Otherwise: the current image's rows only.
        const bool with_text = prompt_as_rows(seq);
        const PromptPart & part = seq.parts[seq.part];
        const int32_t left = with_text ? seq.prefill_left() - 1 : part.media ? part.n_cells() - part.rows_done : 0;
        if (left > 0) {
            int32_t allow = left <= budget ? left : std::max(budget, 0) / ubatch * ubatch;
            if (allow == 0 && step_tokens == 0 && planned == 0) allow = std::min(left, ubatch);
            if (allow > 0) allow = room_for(seq, allow);
            if (allow > 0) {
                const bool was_finished = seq.finished;
                const int32_t n = prefill_rows(seq, allow, with_text);
                if (n > 0) {
                    progress = true;
                    step_tokens += (uint32_t) n;
                    budget -= n;
                    if (!seq.pinned) free_cells -= n;
                }
                progress = progress || seq.finished != was_finished;
            }
        }
        // Text: a text prompt's, or the last token of an image prompt whose rows are all in.
        if (seq.finished || !seq.prefilling() || seq.parts[seq.part].media) continue;
        if (with_text && seq.prefill_left() != 1) continue;
        if (budget <= 0) continue;
        const auto & toks = seq.parts[seq.part].tokens;
        const int32_t take = room_for(seq, std::min<int32_t>(budget, (int32_t) (toks.size() - seq.part_off)));
        if (take == 0) continue;
        if (!seq.pinned) free_cells -= take;
        rows.push_back({&seq, take});
        budget -= take;
        planned += take;
    }
    // The rows go in sequence-id order. With a KV stream per sequence, llama.cpp cuts a batch into
    // ubatches of consecutive sequence ids, scanning in batch order, and each ubatch is one pass
    // over the weights: in admission order a decode step of 8 sequences took 3.6 passes on average.
    std::sort(rows.begin(), rows.end(), [](const Rows & a, const Rows & b) { return a.seq->seq_id < b.seq->seq_id; });
    batch_.n_tokens = 0;
    auto add = [&](llama_token tok, llama_pos pos, llama_seq_id sid, bool logits) {
        const int32_t j = batch_.n_tokens++;
        batch_.token[j] = tok;
        batch_.pos[j] = pos;
        batch_.n_seq_id[j] = 1;
        batch_.seq_id[j][0] = sid;
        batch_.logits[j] = logits;
    };
    for (const Rows & r : rows) {
        Sequence & seq = *r.seq;
        if (r.take < 0) {
            seq.batch_row = batch_.n_tokens;
            add(seq.next, seq.n_past, seq.seq_id, true);
            continue;
        }
        const auto & toks = seq.parts[seq.part].tokens;
        for (int32_t i = 0; i < r.take; i++) add(toks[seq.part_off + i], seq.n_past + i, seq.seq_id, false);
        seq.n_past += r.take;
        seq.n_cells += r.take;
        seq.part_off += r.take;
        if (seq.part_off == toks.size()) {
            seq.part++;
            seq.part_off = 0;
            if (!seq.prefilling()) {
                // Last prompt token: its logits give the first generated token.
                batch_.logits[batch_.n_tokens - 1] = true;
                seq.batch_row = batch_.n_tokens - 1;
            }
        }
    }

    if (batch_.n_tokens > 0) {
        progress = true;
            const auto decode_started = Clock::now();
        const int32_t rc = llama_decode(ctx_, batch_);
        if (rc != 0) {
            const std::string why = rc == 1 ? "the KV cache has no room for this batch" : "llama_decode failed (" + std::to_string(rc) + ")";
            for (auto & seq : running_) {
                if (!seq.finished && seq.batch_row >= 0) finish(seq, "error", why);
            }
        } else {
            steps_++;
            step_tokens += (uint32_t) batch_.n_tokens;
            last_batch_seqs_ = decoding;
            decoded_seqs_total_ += decoding;
            if (decoding > max_batch_seqs_) max_batch_seqs_ = decoding;
            sample_outputs(decode_started);
        }
    }

    count_step_tokens(step_tokens);
    for (auto & seq : running_) {
        if (!seq.pending.tokens.empty() || !seq.pending.text.empty() || seq.pending.finish) {
            out_.push_back(std::move(seq.pending));
            seq.pending = Event{};
            seq.pending.id = seq.req.id;
            seq.pending.index = seq.index;
        }
    }
    release_finished();
    emit(std::move(out_));
    busy_ns_ += ns_between(step_started, Clock::now());
    return progress;
}

bool Engine::run_vision_pass(bool steps_waiting) {
    if (!cpu_turns_ || !vision_->queued()) return false;
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

void Engine::sample_outputs(Clock::time_point decode_started) {
    std::list<Sequence> forked;
    std::vector<std::pair<Sequence *, int32_t>> rows;  // (sequence, its row of this step's logits)
    for (auto & seq : running_) {
        if (seq.finished || seq.batch_row < 0) continue;
        seq.preempted = false;  // its prefill is done: it holds all of itself again
        if (seq.resume_pending) {
            // A resumed prefill ended: the cache holds every generated token again.
            seq.resume_pending = false;
        } else if (seq.n_generated > 0) {
            // The token sampled last step was decoded in this batch.
            seq.n_past++;
            seq.n_cells++;
        } else if (!seq.choice_seq_ids.empty()) {
            // Prefill done: choices 1..n-1 share its KV cells and its last logits.
            for (size_t k = 0; k < seq.choice_seq_ids.size(); k++) {
                forked.push_back(fork_choice(seq, (int32_t) k + 1, seq.choice_seq_ids[k]));
                rows.emplace_back(&forked.back(), seq.batch_row);
            }
            seq.choice_seq_ids.clear();
        }
        rows.emplace_back(&seq, seq.batch_row);
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
    model_ns_ += ns_between(decode_started, draws_started);
    std::vector<Draw> draws(rows.size());
    sampling_->run(rows.size(), [&](size_t i) { draws[i] = draw(*rows[i].first, logits[i]); });
    sample_ns_ += ns_between(draws_started, Clock::now());
    for (size_t i = 0; i < rows.size(); i++) accept(*rows[i].first, std::move(draws[i]));
    running_.splice(running_.end(), forked);
}

Sequence Engine::fork_choice(const Sequence & parent, int32_t index, llama_seq_id seq_id) {
    llama_memory_seq_cp(llama_get_memory(ctx_), parent.seq_id, seq_id, -1, -1);
    Sequence c;
    c.req.id = parent.req.id;
    c.req.sampling = parent.req.sampling;
    c.req.arrived = parent.req.arrived;
    c.admitted = parent.admitted;
    if (c.req.sampling.seed >= 0) c.req.sampling.seed += index;  // distinct but reproducible streams
    c.index = index;
    c.pinned = true;
    c.seq_id = seq_id;
    c.parts = {};
    c.prompt_cells = parent.prompt_cells;
    c.shared_cells = parent.n_cells;
    c.reserved_cells = parent.choice_reserved_cells;
    c.n_past = parent.n_past;
    c.sampler = std::make_unique<Sampler>(vocab_, info_.n_vocab, c.req.sampling, *eog_);
    c.text = std::make_unique<TextStream>(c.req.sampling.stop);
    c.pending.id = c.req.id;
    c.pending.index = index;
    return c;
}

Engine::Draw Engine::draw(Sequence & seq, const float * logits) const {
    const SamplingParams & sp = seq.req.sampling;
    Draw d;
    d.suppress_eog = sp.ignore_eos || seq.n_generated < sp.min_tokens;
    d.token = seq.sampler->sample(logits, d.suppress_eog, sp.logprobs >= 0 ? &d.logprob : nullptr,
                                  std::max(sp.logprobs, 0));
    return d;
}

void Engine::accept(Sequence & seq, Draw && d) {
    const SamplingParams & sp = seq.req.sampling;
    const llama_token tok = d.token;
    const bool suppress_eog = d.suppress_eog;
    TokenLogprob & lp = d.logprob;
    seq.n_generated++;
    generation_tokens_total_++;
    seq.last_token = Clock::now();
    if (seq.n_generated == 1) seq.first_token = seq.last_token;

    const bool is_stop_id = std::find(sp.stop_token_ids.begin(), sp.stop_token_ids.end(), tok) != sp.stop_token_ids.end();
    if (is_stop_id && seq.n_generated > sp.min_tokens) {
        Finish f{"stop"};
        f.stopped_by_token = tok;
        seq.pending.finish = f;
        finish(seq, "stop");
        return;
    }
    if (!suppress_eog && llama_vocab_is_eog(vocab_, tok)) {
        finish(seq, "stop");
        return;
    }
    seq.pending.tokens.push_back(tok);
    if (sp.logprobs >= 0) {
        seq.pending.logprobs.push_back(std::move(lp));
        seq.pending.has_logprobs = true;
    }
    seq.pending.text += seq.text->push(token_piece(vocab_, tok));
    if (seq.text->matched()) {
        finish(seq, "stop");
        return;
    }
    if (seq.n_generated >= sp.max_tokens || (uint32_t) (seq.shared_cells + seq.n_cells) + 1 >= max_model_len_) {
        finish(seq, "length");
        return;
    }
    seq.next = tok;
    seq.generated.push_back(tok);
}

void Engine::finish(Sequence & seq, const std::string & reason, const std::string & error) {
    if (seq.finished) return;
    seq.finished = true;
    const Timings timings = timings_of(seq);
    // Choices never forked (the request ended during its prefill) end the same way.
    for (size_t k = 0; k < seq.choice_seq_ids.size(); k++) {
        Event ev;
        ev.id = seq.req.id;
        ev.index = (int32_t) k + 1;
        ev.finish = Finish{reason, seq.prompt_cells, 0, error};
        ev.finish->timings = Timings{timings.queued};
        out_.push_back(std::move(ev));
        free_seq_ids_.insert(seq.choice_seq_ids[k]);
        reserved_cells_ -= seq.choice_reserved_cells;
    }
    seq.choice_seq_ids.clear();
    seq.pending.text += seq.text ? seq.text->flush() : std::string();
    Finish f = seq.pending.finish.value_or(Finish{});
    f.reason = reason;
    f.prompt_tokens = seq.prompt_cells;
    f.completion_tokens = seq.n_generated;
    f.error = error;
    if (seq.text && seq.text->matched()) f.stopped_by_text = *seq.text->matched();
    f.timings = timings;
    seq.pending.finish = f;
}

Timings Engine::timings_of(const Sequence & seq) const {
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
    if (std::any_of(seq.parts.begin(), seq.parts.end(), [](const PromptPart & p) { return p.media != nullptr; })) {
        t.image_encode = seq.image_encode_seconds;
    }
    return t;
}

void Engine::count_step_tokens(uint32_t tokens) {
    if (tokens == 0) return;
    size_t k = 0;
    while (k + 1 < step_tokens_.size() && (uint64_t{1} << k) < tokens) k++;
    step_tokens_[k]++;
    step_tokens_sum_ += tokens;
}

llama_seq_id Engine::take_seq_id() {
    const llama_seq_id id = *free_seq_ids_.begin();
    free_seq_ids_.erase(free_seq_ids_.begin());
    return id;
}

void Engine::release_finished() {
    for (auto it = running_.begin(); it != running_.end();) {
        if (!it->finished) {
            ++it;
            continue;
        }
        if (it->pending.finish) out_.push_back(std::move(it->pending));
        for (const auto & part : it->parts) {
            if (part.vision_key) vision_->drop(part.vision_key);
        }
        // Free the sequence's KV cells at once.
        llama_memory_seq_rm(llama_get_memory(ctx_), it->seq_id, -1, -1);
        free_seq_ids_.insert(it->seq_id);
        reserved_cells_ -= it->reserved_cells;
        it = running_.erase(it);
    }
    uint32_t used = 0;
    for (const auto & seq : running_) used += seq.n_cells;
    kv_used_ = used;
    n_running_ = (uint32_t) running_.size();
}

void Engine::emit(std::vector<Event> && events) {
    if (events.empty()) return;
    sink_(std::move(events));
    events.clear();
}

}  // namespace caprl
