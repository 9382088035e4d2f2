#include "prompt-prep.h"

#include <algorithm>

namespace caprl {

PromptPrep::PromptPrep(PrepareFn prepare, std::function<void()> on_ready)
    : prepare_(std::move(prepare)), on_ready_(std::move(on_ready)) {
    thread_ = std::thread([this] { loop(); });
}

PromptPrep::~PromptPrep() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stopping_ = true;
        queue_.clear();
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
}

void PromptPrep::submit(std::vector<Job> && jobs) {
    {
        std::lock_guard<std::mutex> lk(mu_);
        for (auto & j : jobs) queue_.push_back(std::move(j));
    }
    cv_.notify_one();
}

bool PromptPrep::take(int64_t id, PreparedPrompt & out) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = done_.find(id);
    if (it == done_.end()) return false;
    out = std::move(it->second);
    done_.erase(it);
    return true;
}

void PromptPrep::drop(int64_t id) {
    std::lock_guard<std::mutex> lk(mu_);
    done_.erase(id);
    const auto it = std::find_if(queue_.begin(), queue_.end(), [&](const Job & j) { return j.id == id; });
    if (it != queue_.end()) queue_.erase(it);
    else if (busy_id_ == id) dropped_.insert(id);
}

void PromptPrep::loop() {
    for (;;) {
        Job job;
        {
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
            if (stopping_) return;
            job = std::move(queue_.front());
            queue_.pop_front();
            busy_id_ = job.id;
        }
        PreparedPrompt p = prepare_(job.prompt, std::move(job.images));
        bool drained = false;
        {
            std::lock_guard<std::mutex> lk(mu_);
            busy_id_ = -1;
            if (dropped_.erase(job.id) == 0 && !stopping_) done_[job.id] = std::move(p);
            drained = queue_.empty();
        }
        // A running engine takes each result at its next step anyway; an idle one is woken when
        // the prompts handed over together are all ready, so that they start in the same step
        // (one at a time, a burst would start staggered, each in a batch of its own).
        if (drained) on_ready_();
    }
}

}  // namespace caprl
