// When the model and the vision encoder both compute on the CPU, they take turns, each with every
// core, instead of splitting the cores between them. A split idles one side's share whenever the
// other side has the work (at one request at a time, each image was encoded on a quarter of the
// cores while the decode threads waited for it), and two ggml thread pools on the same cores stall
// each other at their barriers. A party takes the CPU when it is free; when both wait, the one that
// did not go last goes, so engine steps and encoder passes alternate: images are encoded as soon as
// they come, which keeps the decode batch full (on a CPU a step of 8 sequences costs about what a
// step of one does). An encoder pass is long, though (seconds per image for CapRL-3B here), so
// between two of its layers (yield_between_layers) it lets in an engine step that has waited
// max_wait (EngineOptions::vision_yield_after_ms, default 500 ms) or more: decoding waits for at most about that plus one layer, not a
// whole pass.
#pragma once

#include "ggml.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
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
    // max_wait: how long a party may wait for the CPU before the other yields to it (yield()).
    CpuTurns(bool on, std::chrono::milliseconds max_wait) : on_(on), max_wait_(max_wait) {}
    CpuTurns(const CpuTurns &) = delete;
    CpuTurns & operator=(const CpuTurns &) = delete;

    bool on() const { return on_; }

    // Waits until the CPU is this party's. Not reentrant: a party holds at most one turn.
    Turn take(Party p) {
        if (!on_) return Turn();
        const auto started = Clock::now();
        std::unique_lock<std::mutex> lk(mu_);
        wait_for_cpu(lk, p, started);
        lk.unlock();
        waited_ns_[p] += ns(Clock::now() - started);
        return Turn(this, p);
    }

    // Called by the party holding the CPU between two parts of its work: when the other party has
    // waited max_wait or more, it gets one turn, and then the CPU comes back (the caller's Turn
    // stays valid).
    void yield(Party p) {
        if (!on_) return;
        const auto started = Clock::now();
        std::unique_lock<std::mutex> lk(mu_);
        const Party o = other(p);
        if (!busy_ || holder_ != p || !waiting_[o] || started - waiting_since_[o] < max_wait_) return;
        yields_[p]++;
        busy_ = false;
        last_ = p;
        cv_.notify_all();
        wait_for_cpu(lk, p, started);
        lk.unlock();
        waited_ns_[p] += ns(Clock::now() - started);
    }

    // A ggml_backend_sched eval callback (user_data: the CpuTurns) for a vision encoder's graph:
    // the scheduler then computes the graph up to each layer's output ("layer_out-<i>", as clip
    // names it) and calls back, and the vision party yields there.
    static bool yield_between_layers(ggml_tensor * t, bool ask, void * user_data) {
        if (ask) return std::strncmp(ggml_get_name(t), kLayerOut, sizeof(kLayerOut) - 1) == 0;
        static_cast<CpuTurns *>(user_data)->yield(kVision);
        return true;
    }
    static constexpr char kLayerOut[] = "layer_out-";

    // Time a party spent waiting for the other's turn to end.
    double waited_seconds(Party p) const { return waited_ns_[p] * 1e-9; }
    // Times a party gave the CPU to the other in the middle of its work (yield).
    uint64_t yields(Party p) const { return yields_[p]; }

  private:
    using Clock = std::chrono::steady_clock;
    static uint64_t ns(Clock::duration d) { return (uint64_t) std::chrono::duration_cast<std::chrono::nanoseconds>(d).count(); }
    static Party other(Party p) { return p == kModel ? kVision : kModel; }

    // With mu_ held: waits until the CPU is free and, if the other party waits too, this one did
    // not go last; then holds it.
    void wait_for_cpu(std::unique_lock<std::mutex> & lk, Party p, Clock::time_point since) {
        waiting_[p] = true;
        waiting_since_[p] = since;
        cv_.wait(lk, [&] { return !busy_ && (!waiting_[other(p)] || last_ != p); });
        waiting_[p] = false;
        busy_ = true;
        holder_ = p;
    }
    void end(Party p) {
        {
            std::lock_guard<std::mutex> lk(mu_);
            busy_ = false;
            last_ = p;
        }
        cv_.notify_all();
    }

    const bool on_;
    const std::chrono::milliseconds max_wait_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool busy_ = false;
    Party holder_ = kModel;  // while busy_
    bool waiting_[2] = {false, false};
    Clock::time_point waiting_since_[2];
    int last_ = -1;  // the party whose turn ended last
    std::atomic<uint64_t> waited_ns_[2] = {};
    std::atomic<uint64_t> yields_[2] = {};
};

}  // namespace caprl
