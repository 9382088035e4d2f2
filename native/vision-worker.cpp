#include "vision-worker.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>

namespace caprl {

VisionWorker::VisionWorker(mtmd_context * mtmd, QwenVisionEncoder * encoder, int32_t n_embd, size_t cache_bytes, Passes passes,
                           std::function<void()> on_ready)
    : mtmd_(mtmd), encoder_(encoder), n_embd_(n_embd), cache_limit_(cache_bytes),
      jobs_([this](std::vector<Job> & jobs) { return encode(jobs); }, std::move(on_ready), std::chrono::milliseconds(0),
            [this](const std::deque<Job> & queue) { return batch_size(queue); },
            passes == Passes::kByEngine ? JobThread<Job, Result>::Threading::kCaller : JobThread<Job, Result>::Threading::kOwn) {}

void VisionWorker::submit(std::vector<Job> && jobs) {
    std::vector<Job> misses;
    for (Job & job : jobs) {
        const char * id = mtmd_input_chunk_get_id(job.chunk);
        Result cached{true, {}};
        bool hit = false;
        {
            std::lock_guard<std::mutex> lk(cache_mu_);
            hit = id && cache_get(id, cached.embd);
        }
        if (hit) {
            hits_++;
            jobs_.complete(job.key, std::move(cached));
            continue;
        }
        if (id && cache_limit_ > 0) misses_++;
        if (!encoder_) job.image = nullptr;
        misses.push_back(std::move(job));
    }
    if (!misses.empty()) jobs_.submit(std::move(misses));
}

bool VisionWorker::cache_get(const std::string & id, Embeddings & out) {
    auto it = cache_.find(id);
    if (it == cache_.end()) return false;
    lru_.splice(lru_.begin(), lru_, it->second);
    out = it->second->second;
    return true;
}

void VisionWorker::cache_put(const std::string & id, const Embeddings & embd) {
    const size_t bytes = embd->size() * sizeof(float);
    if (bytes > cache_limit_ || cache_.count(id)) return;
    lru_.emplace_front(id, embd);
    cache_[id] = lru_.begin();
    cache_bytes_ += bytes;
    while (cache_bytes_ > cache_limit_) {
        auto & last = lru_.back();
        cache_bytes_ -= last.second->size() * sizeof(float);
        cache_.erase(last.first);
        lru_.pop_back();
    }
}

bool VisionWorker::take(uint64_t key, Embeddings & embd, bool & ok, double & seconds) {
    Result r;
    if (!jobs_.take(key, r)) return false;
    ok = r.ok;
    seconds = r.seconds;
    embd = std::move(r.embd);
    return true;
}

void VisionWorker::drop(uint64_t key) { jobs_.drop(key); }

size_t VisionWorker::batch_size(const std::deque<Job> & queue) const {
    if (!encoder_ || !queue.front().image) return 1;
    const int64_t budget = encoder_->max_patches();
    int64_t patches = 0;
    size_t n = 0;
    for (const Job & next : queue) {
        if (!next.image) break;
        int64_t p = 0;
        try {
            p = QwenVisionEncoder::n_patches(*next.image);
        } catch (const std::exception &) {}  // the encoder reports the bad image
        if (n > 0 && patches + p > budget) break;
        patches += p;
        n++;
    }
    return n;
}

std::vector<VisionWorker::Result> VisionWorker::encode(std::vector<Job> & jobs) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<Result> results(jobs.size());
    if (!encoder_) {
        Result & r = results[0];
        r.ok = mtmd_encode_chunk(mtmd_, jobs[0].chunk) == 0;
        if (r.ok) {
            const float * out = mtmd_get_output_embd(mtmd_);
            r.embd = std::make_shared<const std::vector<float>>(out, out + (size_t) n_embd_ * mtmd_input_chunk_get_n_tokens(jobs[0].chunk));
        }
    } else if (!jobs[0].image) {
        // Not reachable from the engine (each image part gets its image); mtmd holds only a
        // placeholder of the image's size then, so clip could not stand in: the chunk fails.
        fprintf(stderr, "caprl vision encoder: an image chunk came without its pixels\n");
    } else {
        std::vector<const Image *> images;
        for (const Job & j : jobs) images.push_back(j.image.get());
        try {
            std::vector<std::vector<float>> embd = encoder_->encode(images);
            for (size_t i = 0; i < jobs.size(); i++) {
                // The rows must be the ones mtmd planned for the chunk (same canvas rule), or the
                // prompt's positions would not match.
                results[i].ok = embd[i].size() == (size_t) n_embd_ * mtmd_input_chunk_get_n_tokens(jobs[i].chunk);
                if (results[i].ok) results[i].embd = std::make_shared<const std::vector<float>>(std::move(embd[i]));
            }
        } catch (const std::exception & e) {
            fprintf(stderr, "caprl vision encoder: %s\n", e.what());
        }
    }
    // A pass's images are ready together: each waited the whole pass.
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard<std::mutex> lk(cache_mu_);
    for (size_t i = 0; i < jobs.size(); i++) {
        results[i].seconds = seconds;
        const char * id = mtmd_input_chunk_get_id(jobs[i].chunk);
        if (results[i].ok && id) cache_put(id, results[i].embd);
    }
    return results;
}

}  // namespace caprl
