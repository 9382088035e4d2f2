// Encodes image chunks on a thread of its own, so the decode loop never waits on the vision
// encoder: the engine submits every image of a request when it is admitted and decodes the
// embeddings into the KV cache once they are ready. With our own encoder (QwenVisionEncoder),
// every queued image, up to the encoder's graph capacity (max_patches()), is encoded in one pass.
// When the model and the encoder share the CPU, the engine thread runs the passes itself
// (Passes::kByEngine), between its steps: they take turns with every core, and all of the
// process's ggml CPU work runs on one thread, so one OpenMP team (see engine.cpp).
#pragma once

#include "job-thread.h"
#include "mtmd.h"
#include "qwen-vision-encoder.h"
#include "types.h"

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace caprl {

using SharedChunks = std::shared_ptr<mtmd_input_chunks>;

class VisionWorker {
  public:
    // Who runs the encoder passes: the worker's own thread, or the engine's (run_pass()).
    enum class Passes { kOwnThread, kByEngine };
    // on_ready is called (from the thread that ran the pass) after each encode, successful or not.
    // Encoded embeddings are kept in an LRU cache of at most cache_bytes, keyed by the chunk's id
    // (the engine sets it to a hash of the image's pixels and size). With `encoder` (may be null),
    // images are encoded by it, in batches, instead of by mtmd/clip one at a time.
    VisionWorker(mtmd_context * mtmd, QwenVisionEncoder * encoder, int32_t n_embd, size_t cache_bytes, Passes passes,
                 std::function<void()> on_ready);

    // One image chunk to encode: `owner` keeps it alive while queued or being encoded; `image` is
    // the chunk's RGB image (shared, not copied: our encoder preprocesses it itself; mtmd ignores it).
    struct Job {
        uint64_t key;
        SharedChunks owner;
        const mtmd_input_chunk * chunk;
        ImagePtr image;
    };
    // Queues image chunks handed over together (one engine step's), so that the next pass sees all
    // of them: handed over one by one, the pass starting on the first took only those queued so far.
    void submit(std::vector<Job> && jobs);
    // If the chunk is encoded, hands its embeddings over (null on failure) and returns true;
    // seconds: time this worker spent encoding it (0 for a cache hit).
    bool take(uint64_t key, Embeddings & embd, bool & ok, double & seconds);
    // Forgets a chunk whose request ended; its result, if any, is discarded.
    void drop(uint64_t key);
    // Passes::kByEngine: encodes the next pass of queued images on the calling thread; false when
    // none is queued.
    bool run_pass() { return jobs_.run_pass(); }
    bool queued() const { return jobs_.queued(); }

    uint64_t cache_hits() const { return hits_; }
    uint64_t cache_misses() const { return misses_; }

  private:
    struct Result {
        bool ok = false;
        Embeddings embd;
        double seconds = 0;
    };
    // How many queued jobs the next pass takes: mtmd one; our encoder every queued image that
    // fits one of its graphs, whose buffers it sized (reserve()) for that many patches.
    size_t batch_size(const std::deque<Job> & queue) const;
    // Encodes a pass of jobs with encoder_ (all of them in one pass) or mtmd (a batch of one).
    std::vector<Result> encode(std::vector<Job> & jobs);
    // LRU cache of embeddings by chunk id, guarded by cache_mu_.
    bool cache_get(const std::string & id, Embeddings & out);
    void cache_put(const std::string & id, const Embeddings & embd);

    mtmd_context * mtmd_;
    QwenVisionEncoder * encoder_;
    int32_t n_embd_;
    std::mutex cache_mu_;
    size_t cache_limit_;
    size_t cache_bytes_ = 0;
    std::list<std::pair<std::string, Embeddings>> lru_;  // most recent first
    std::unordered_map<std::string, decltype(lru_)::iterator> cache_;
    std::atomic<uint64_t> hits_{0};
    std::atomic<uint64_t> misses_{0};
    // Last: its thread stops (destroyed first) before the members it uses go.
    JobThread<Job, Result> jobs_;
};

}  // namespace caprl
