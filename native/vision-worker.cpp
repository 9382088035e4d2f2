#include "vision-worker.h"

#include <algorithm>

namespace caprl {

VisionWorker::VisionWorker(mtmd_context * mtmd, int32_t n_embd, size_t cache_bytes, std::function<void()> on_ready)
    : mtmd_(mtmd), n_embd_(n_embd), on_ready_(std::move(on_ready)), cache_limit_(cache_bytes) {
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

void VisionWorker::submit(uint64_t key, SharedChunks owner, const mtmd_input_chunk * chunk) {
    const char * id = mtmd_input_chunk_get_id(chunk);
    {
        std::lock_guard<std::mutex> lk(mu_);
        Result cached{true, {}};
        if (id && cache_get(id, cached.embd)) {
            hits_++;
            done_.emplace(key, std::move(cached));
        } else {
            if (id && cache_limit_ > 0) misses_++;
            queue_.push_back({key, std::move(owner), chunk});
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

bool VisionWorker::take(uint64_t key, std::vector<float> & embd, bool & ok) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = done_.find(key);
    if (it == done_.end()) return false;
    ok = it->second.ok;
    embd = std::move(it->second.embd);
    done_.erase(it);
    return true;
}

void VisionWorker::drop(uint64_t key) {
    std::lock_guard<std::mutex> lk(mu_);
    if (done_.erase(key)) return;
    const auto before = queue_.size();
    queue_.erase(std::remove_if(queue_.begin(), queue_.end(), [&](const Job & j) { return j.key == key; }), queue_.end());
    if (queue_.size() == before && busy_key_ == key) dropped_.insert(key);
}

void VisionWorker::loop() {
    for (;;) {
        Job job;
        {
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
            if (stopping_) return;
            job = std::move(queue_.front());
            queue_.pop_front();
            busy_key_ = job.key;
        }
        Result r{mtmd_encode_chunk(mtmd_, job.chunk) == 0, {}};
        if (r.ok) {
            const float * out = mtmd_get_output_embd(mtmd_);
            const size_t n = (size_t) n_embd_ * mtmd_input_chunk_get_n_tokens(job.chunk);
            r.embd.assign(out, out + n);
        }
        const char * id = mtmd_input_chunk_get_id(job.chunk);
        const std::string cache_id = id ? id : "";
        job.owner.reset();
        {
            std::lock_guard<std::mutex> lk(mu_);
            busy_key_ = 0;
            if (r.ok && !cache_id.empty()) cache_put(cache_id, r.embd);
            if (!dropped_.erase(job.key)) done_.emplace(job.key, std::move(r));
        }
        on_ready_();
    }
}

}  // namespace caprl
