#include "vision-worker.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>

namespace caprl {

VisionWorker::VisionWorker(mtmd_context * mtmd, QwenVisionEncoder * encoder, int32_t n_embd, size_t cache_bytes, std::function<void()> on_ready)
    : mtmd_(mtmd), encoder_(encoder), n_embd_(n_embd), on_ready_(std::move(on_ready)), cache_limit_(cache_bytes) {
    thread_ = std::thread([this] { loop(); });
}

VisionWorker::~VisionWorker() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stopping_ = true;
        queue_.clear();
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
}

void VisionWorker::submit(uint64_t key, SharedChunks owner, const mtmd_input_chunk * chunk, const Image * image) {
    const char * id = mtmd_input_chunk_get_id(chunk);
    {
        std::lock_guard<std::mutex> lk(mu_);
        Result cached{true, {}};
        if (id && cache_get(id, cached.embd)) {
            hits_++;
            done_.emplace(key, std::move(cached));
        } else {
            if (id && cache_limit_ > 0) misses_++;
            std::shared_ptr<const Image> copy;
            if (encoder_ && image) copy = std::make_shared<const Image>(*image);
            queue_.push_back({key, std::move(owner), chunk, std::move(copy)});
            cv_.notify_one();
            return;
        }
    }
    on_ready_();
}

bool VisionWorker::cache_get(const std::string & id, std::vector<float> & out) {
    auto it = cache_.find(id);
    if (it == cache_.end()) return false;
    lru_.splice(lru_.begin(), lru_, it->second);
    out = it->second->second;
    return true;
}

void VisionWorker::cache_put(const std::string & id, const std::vector<float> & embd) {
    const size_t bytes = embd.size() * sizeof(float);
    if (bytes > cache_limit_ || cache_.count(id)) return;
    lru_.emplace_front(id, embd);
    cache_[id] = lru_.begin();
    cache_bytes_ += bytes;
    while (cache_bytes_ > cache_limit_) {
        auto & last = lru_.back();
        cache_bytes_ -= last.second.size() * sizeof(float);
        cache_.erase(last.first);
        lru_.pop_back();
    }
}

bool VisionWorker::take(uint64_t key, std::vector<float> & embd, bool & ok, double & seconds) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = done_.find(key);
    if (it == done_.end()) return false;
    ok = it->second.ok;
    seconds = it->second.seconds;
    embd = std::move(it->second.embd);
    done_.erase(it);
    return true;
}

void VisionWorker::drop(uint64_t key) {
    std::lock_guard<std::mutex> lk(mu_);
    if (done_.erase(key)) return;
    const auto before = queue_.size();
    queue_.erase(std::remove_if(queue_.begin(), queue_.end(), [&](const Job & j) { return j.key == key; }), queue_.end());
    if (queue_.size() == before && busy_.count(key)) dropped_.insert(key);
}

std::vector<VisionWorker::Result> VisionWorker::encode(const std::vector<Job> & jobs) {
    std::vector<Result> results(jobs.size(), Result{false, {}});
    if (!encoder_ || !jobs[0].image) {
        Result & r = results[0];
        r.ok = mtmd_encode_chunk(mtmd_, jobs[0].chunk) == 0;
        if (r.ok) {
            const float * out = mtmd_get_output_embd(mtmd_);
            r.embd.assign(out, out + (size_t) n_embd_ * mtmd_input_chunk_get_n_tokens(jobs[0].chunk));
        }
        return results;
    }
    std::vector<const Image *> images;
    for (const Job & j : jobs) images.push_back(j.image.get());
    try {
        std::vector<std::vector<float>> embd = encoder_->encode(images);
        for (size_t i = 0; i < jobs.size(); i++) {
            // The rows must be the ones mtmd planned for the chunk (same canvas rule), or the
            // prompt's positions would not match.
            results[i].ok = embd[i].size() == (size_t) n_embd_ * mtmd_input_chunk_get_n_tokens(jobs[i].chunk);
            if (results[i].ok) results[i].embd = std::move(embd[i]);
        }
    } catch (const std::exception & e) {
        fprintf(stderr, "caprl vision encoder: %s\n", e.what());
    }
    return results;
}

void VisionWorker::loop() {
    for (;;) {
        std::vector<Job> jobs;
        {
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
            if (stopping_) return;
            // mtmd: one image. Our encoder: every queued image that fits one of its graphs, whose
            // buffers it sized (reserve()) for that many patches (at least one image).
            const bool ours = encoder_ && queue_.front().image;
            const int64_t budget = encoder_ ? encoder_->max_patches() : 0;
            int64_t patches = 0;
            while (!queue_.empty()) {
                Job & next = queue_.front();
                if (!jobs.empty() && (!ours || !next.image)) break;
                int64_t n = 0;
                try {
                    n = ours ? QwenVisionEncoder::n_patches(*next.image) : 0;
                } catch (const std::exception &) {}  // the encoder reports the bad image
                if (!jobs.empty() && patches + n > budget) break;
                patches += n;
                busy_.insert(next.key);
                jobs.push_back(std::move(next));
                queue_.pop_front();
            }
        }
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<Result> results = encode(jobs);
        // A batch's images are ready together: each waited the whole pass.
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        for (Result & r : results) r.seconds = seconds;
        {
            std::lock_guard<std::mutex> lk(mu_);
            for (size_t i = 0; i < jobs.size(); i++) {
                const char * id = mtmd_input_chunk_get_id(jobs[i].chunk);
                busy_.erase(jobs[i].key);
                if (results[i].ok && id) cache_put(id, results[i].embd);
                if (!dropped_.erase(jobs[i].key)) done_.emplace(jobs[i].key, std::move(results[i]));
            }
        }
        jobs.clear();  // releases the chunks (their owners may be gone)
        on_ready_();
    }
}

}  // namespace caprl
