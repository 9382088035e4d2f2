// When the model and the vision encoder both compute on the CPU, they take turns, each with every
// core, instead of splitting the cores between them. A split idles one side's share whenever the
// other side has the work (at one request at a time, each image was encoded on a quarter of the
// cores while the decode threads waited for it), and two ggml thread pools on the same cores stall
// each other at their barriers. A party takes the CPU when it is free; when both wait, the one that
// did not go last goes, so engine steps and encoder passes alternate.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace caprl {

class CpuTurns {
  public:
    enum Party { kModel = 0, kVision = 1 };

    // The CPU, held by one party until released (or destroyed). An empty Turn holds nothing.
    class Turn {
      public:
        Turn() = default;
        Turn(Turn && o) noexcept : turns_(o.turns_), party_(o.party_) { o.turns_ = nullptr; }
        Turn & operator=(Turn && o) noexcept {
            if (this != &o) {
                release();
                turns_ = o.turns_;
                party_ = o.party_;
                o.turns_ = nullptr;
            }
            return *this;
        }
        Turn(const Turn &) = delete;
        Turn & operator=(const Turn &) = delete;
        ~Turn() { release(); }

        bool held() const { return turns_ != nullptr; }
        void release() {
            if (turns_) turns_->end(party_);
            turns_ = nullptr;
        }

      private:
        friend class CpuTurns;
        Turn(CpuTurns * turns, Party party) : turns_(turns), party_(party) {}
        CpuTurns * turns_ = nullptr;
        Party party_ = kModel;
    };

    // on: the parties share the CPU by turns; off (either computes on a GPU): take() never waits.
    explicit CpuTurns(bool on) : on_(on) {}
    CpuTurns(const CpuTurns &) = delete;
    CpuTurns & operator=(const CpuTurns &) = delete;

    bool on() const { return on_; }

    // Waits until the CPU is this party's. Not reentrant: a party holds at most one turn.
    Turn take(Party p) {
        if (!on_) return Turn();
        const auto started = std::chrono::steady_clock::now();
        std::unique_lock<std::mutex> lk(mu_);
        waiting_[p] = true;
        cv_.wait(lk, [&] { return !busy_ && (!waiting_[other(p)] || last_ != p); });
        waiting_[p] = false;
        busy_ = true;
        lk.unlock();
        waited_ns_[p] += (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count();
        return Turn(this, p);
    }

    // Time a party spent waiting for the other's turn to end.
    double waited_seconds(Party p) const { return waited_ns_[p] * 1e-9; }

  private:
    static Party other(Party p) { return p == kModel ? kVision : kModel; }
    void end(Party p) {
        {
            std::lock_guard<std::mutex> lk(mu_);
            busy_ = false;
            last_ = p;
        }
        cv_.notify_all();
    }

    const bool on_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool busy_ = false;
    bool waiting_[2] = {false, false};
    int last_ = -1;  // the party whose turn ended last
    std::atomic<uint64_t> waited_ns_[2] = {};
};

}  // namespace caprl
