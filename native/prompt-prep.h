// Prepares prompts off the engine thread: tokenization and, for images, mtmd's tokenize (which
// preprocesses every image: 20-30 ms for a 1036x1036 image on the 2-core VM). The engine hands
// the next waiting requests here before it can admit them, so decoding never waits on it, and a
// request that must wait for KV cells is prepared once, not again at every step.
#pragma once

#include "sequence.h"
#include "types.h"

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace caprl {

struct PreparedPrompt {
    std::string error;           // empty: ready to admit
    SharedChunks chunks;         // keeps media chunks alive (mtmd)
    std::vector<PromptPart> parts;
    int32_t prompt_cells = 0;
    std::vector<Image> images;   // the request's images, handed back (our encoder reads the pixels)
};

class PromptPrep {
  public:
    using PrepareFn = std::function<PreparedPrompt(const std::string & prompt, std::vector<Image> && images)>;
    struct Job {
        int64_t id;
        std::string prompt;
        std::vector<Image> images;
    };
    // on_ready is called (from the prep thread) each time the queue runs empty: every job handed
    // over so far is prepared (or dropped).
    PromptPrep(PrepareFn prepare, std::function<void()> on_ready);
    ~PromptPrep();  // drops pending work and joins

    void submit(std::vector<Job> && jobs);
    // If prompt `id` is prepared, moves it out and returns true.
    bool take(int64_t id, PreparedPrompt & out);
    // Forgets a request that ended before admission.
    void drop(int64_t id);

  private:
    void loop();

    PrepareFn prepare_;
    std::function<void()> on_ready_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Job> queue_;
    std::unordered_map<int64_t, PreparedPrompt> done_;
    std::unordered_set<int64_t> dropped_;
    int64_t busy_id_ = -1;
    bool stopping_ = false;
    std::thread thread_;
};

}  // namespace caprl
