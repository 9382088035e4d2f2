// A thread that works through a queue of keyed jobs for the engine thread and keeps each result
// until the engine takes it. A job dropped while queued is removed; one dropped while it runs has
// its result discarded when it finishes. The prompt-prep thread and the vision worker are each
// one of these; they differ in what a job is, how many run in one pass, and when the engine is told.
// Without a thread of its own (Threading::kCaller), the owner runs the passes (run_pass()).
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace caprl {

// Job must have a `key` member (uint64_t), unique among the jobs and results held.
template <typename Job, typename Result>
class JobThread {
  public:
    // Runs a pass over jobs taken from the queue, off the lock; one result per job, in order.
    using RunFn = std::function<std::vector<Result>(std::vector<Job> & jobs)>;
    // How many jobs from the front of the (non-empty) queue make the next pass (at least 1);
    // called with the lock held.
    using BatchFn = std::function<size_t(const std::deque<Job> & queue)>;
    // on_ready is called after a pass when the queue has run empty, or when the oldest result not
    // yet reported has waited `hold` (0: after every pass). Cheap jobs handed over together are
    // then reported ready together, while an expensive burst does not hold back its first results
    // until its last is done.
    enum class Threading { kOwn, kCaller };
    JobThread(RunFn run, std::function<void()> on_ready, std::chrono::milliseconds hold, BatchFn batch = nullptr,
              Threading threading = Threading::kOwn)
        : run_(std::move(run)), batch_(std::move(batch)), on_ready_(std::move(on_ready)), hold_(hold) {
        if (threading == Threading::kOwn) thread_ = std::thread([this] { loop(); });
    }

    ~JobThread() {  // drops pending work and joins
        {
            std::lock_guard<std::mutex> lk(mu_);
            stopping_ = true;
            queue_.clear();
        }
        cv_.notify_all();
        if (thread_.joinable()) thread_.join();
    }

    JobThread(const JobThread &) = delete;
    JobThread & operator=(const JobThread &) = delete;

    void submit(std::vector<Job> && jobs) {
        {
            std::lock_guard<std::mutex> lk(mu_);
            for (auto & j : jobs) queue_.push_back(std::move(j));
        }
        cv_.notify_one();
    }

    // A result that needs no pass (a cache hit): held for take() at once, and on_ready called.
    void complete(uint64_t key, Result && r) {
        {
            std::lock_guard<std::mutex> lk(mu_);
            done_.insert_or_assign(key, std::move(r));
        }
        on_ready_();
    }

    // If job `key` is done and reported (on_ready called since), moves its result out and returns
    // true. A result not reported yet stays held: jobs reported together are taken together.
    bool take(uint64_t key, Result & out) {
        std::lock_guard<std::mutex> lk(mu_);
        if (unreported_.count(key)) return false;
        auto it = done_.find(key);
        if (it == done_.end()) return false;
        out = std::move(it->second);
        done_.erase(it);
        return true;
    }

    // Threading::kCaller: runs the next pass on the calling thread, if a job is queued; returns
    // whether one ran.
    bool run_pass() {
        std::vector<Job> jobs;
        {
            std::lock_guard<std::mutex> lk(mu_);
            if (queue_.empty()) return false;
            take_batch(jobs);
        }
        finish_pass(jobs, run_(jobs));
        return true;
    }

    bool queued() const {
        std::lock_guard<std::mutex> lk(mu_);
        return !queue_.empty();
    }

    // Forgets a job whose request ended, wherever it is.
    void drop(uint64_t key) {
        std::lock_guard<std::mutex> lk(mu_);
        unreported_.erase(key);
        if (done_.erase(key)) return;
        for (auto it = queue_.begin(); it != queue_.end(); ++it) {
            if (it->key == key) {
                queue_.erase(it);
                return;
            }
        }
        if (running_.count(key)) dropped_.insert(key);
    }

  private:
    void loop() {
        for (;;) {
            std::vector<Job> jobs;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
                if (stopping_) return;
                take_batch(jobs);
            }
            finish_pass(jobs, run_(jobs));
        }
    }

    // Caller holds mu_; the queue is not empty.
    void take_batch(std::vector<Job> & jobs) {
        const size_t n = batch_ ? std::max<size_t>(1, std::min(batch_(queue_), queue_.size())) : 1;
        for (size_t i = 0; i < n; i++) {
            running_.insert(queue_.front().key);
            jobs.push_back(std::move(queue_.front()));
            queue_.pop_front();
        }
    }

    void finish_pass(std::vector<Job> & jobs, std::vector<Result> && results) {
        const auto now = std::chrono::steady_clock::now();
        if (!unreported_since_) unreported_since_ = now;
        bool report = false;
        {
            std::lock_guard<std::mutex> lk(mu_);
            for (size_t i = 0; i < jobs.size(); i++) {
                const uint64_t key = jobs[i].key;
                running_.erase(key);
                if (dropped_.erase(key) || stopping_) continue;
                done_.insert_or_assign(key, std::move(results[i]));
                unreported_.insert(key);
            }
            report = queue_.empty() || now - *unreported_since_ >= hold_;
            if (report) unreported_.clear();
        }
        jobs.clear();  // releases what the jobs held before the engine is told
        if (report) {
            unreported_since_.reset();
            on_ready_();
        }
    }

    RunFn run_;
    BatchFn batch_;
    std::function<void()> on_ready_;
    std::chrono::milliseconds hold_;
    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Job> queue_;
    std::optional<std::chrono::steady_clock::time_point> unreported_since_;  // touched by the one thread that runs passes
    std::unordered_map<uint64_t, Result> done_;
    std::unordered_set<uint64_t> running_;
    std::unordered_set<uint64_t> dropped_;     // dropped while running: the result is discarded
    std::unordered_set<uint64_t> unreported_;  // done, on_ready not called since: not taken yet
    bool stopping_ = false;
    std::thread thread_;
};

}  // namespace caprl
