// Encodes image chunks on a thread of its own, so the decode loop never waits on the vision
// encoder: the engine submits every image of a request when it is admitted and decodes the
// embeddings into the KV cache once they are ready.
#pragma once

#include "mtmd.h"

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace caprl {

using SharedChunks = std::shared_ptr<mtmd_input_chunks>;

class VisionWorker {
  public:
    // on_ready is called (from the worker thread) after each encode, successful or not.
    VisionWorker(mtmd_context * mtmd, int32_t n_embd, std::function<void()> on_ready);
    ~VisionWorker();  // drops pending work and joins

    // Queues one image chunk; `owner` keeps it alive while queued or being encoded.
    void submit(uint64_t key, SharedChunks owner, const mtmd_input_chunk * chunk);
    // If the chunk is encoded, moves its embeddings out (empty on failure) and returns true.
    bool take(uint64_t key, std::vector<float> & embd, bool & ok);
    // Forgets a chunk whose request ended; its result, if any, is discarded.
    void drop(uint64_t key);

  private:
    struct Job {
        uint64_t key;
        SharedChunks owner;
        const mtmd_input_chunk * chunk;
    };
    struct Result {
        bool ok;
        std::vector<float> embd;
    };
    void loop();

    mtmd_context * mtmd_;
    int32_t n_embd_;
    std::function<void()> on_ready_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Job> queue_;
    std::unordered_map<uint64_t, Result> done_;
    std::unordered_set<uint64_t> dropped_;
    uint64_t busy_key_ = 0;
    bool stopping_ = false;
    std::thread thread_;
};

}  // namespace caprl
