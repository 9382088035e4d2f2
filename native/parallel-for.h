// A small pool of persistent threads that runs fn(i) for i in [0, n), the calling thread helping.
// The engine samples every sequence of a step through it: each sequence owns its sampler (and
// RNG), so the tokens do not depend on which thread drew them.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace caprl {

class ParallelFor {
  public:
    explicit ParallelFor(int n_threads) {
        for (int i = 1; i < n_threads; i++) workers_.emplace_back([this] { work(); });
    }
    ~ParallelFor() {
        {
            std::lock_guard<std::mutex> lk(mu_);
            stopping_ = true;
        }
        wake_.notify_all();
        for (auto & t : workers_) t.join();
    }
    ParallelFor(const ParallelFor &) = delete;
    ParallelFor & operator=(const ParallelFor &) = delete;

    size_t threads() const { return workers_.size() + 1; }

    // Returns once every fn(i) has returned. Not reentrant.
    void run(size_t n, const std::function<void(size_t)> & fn) {
        if (workers_.empty() || n < 2) {
            for (size_t i = 0; i < n; i++) fn(i);
            return;
        }
        {
            std::lock_guard<std::mutex> lk(mu_);
            fn_ = &fn;
            n_ = n;
            next_.store(0);
            busy_ = workers_.size();
            generation_++;
        }
        wake_.notify_all();
        drain(fn, n);
        std::unique_lock<std::mutex> lk(mu_);
        done_.wait(lk, [&] { return busy_ == 0; });
        fn_ = nullptr;
    }

  private:
    void drain(const std::function<void(size_t)> & fn, size_t n) {
        for (size_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) fn(i);
    }
    void work() {
        uint64_t seen = 0;
        for (;;) {
            const std::function<void(size_t)> * fn;
            size_t n;
            {
                std::unique_lock<std::mutex> lk(mu_);
                wake_.wait(lk, [&] { return stopping_ || generation_ != seen; });
                if (stopping_) return;
                seen = generation_;
                fn = fn_;
                n = n_;
            }
            drain(*fn, n);
            {
                std::lock_guard<std::mutex> lk(mu_);
                if (--busy_ == 0) done_.notify_one();
            }
        }
    }

    std::vector<std::thread> workers_;
    std::mutex mu_;
    std::condition_variable wake_, done_;
    const std::function<void(size_t)> * fn_ = nullptr;
    size_t n_ = 0;
    std::atomic<size_t> next_{0};
    size_t busy_ = 0;
    uint64_t generation_ = 0;
    bool stopping_ = false;
};

}  // namespace caprl
