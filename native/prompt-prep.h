// Prepares prompts off the engine thread: tokenization and, for images, mtmd's tokenize (which
// preprocesses every image: 20-30 ms for a 1036x1036 image on the 2-core VM). The engine hands
// the next waiting requests here before it can admit them, so decoding never waits on it, and a
// request that must wait for KV cells is prepared once, not again at every step.
#pragma once

#include "job-thread.h"
#include "sequence.h"
#include "types.h"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace caprl {

struct PreparedPrompt {
    std::string error;           // empty: ready to admit
    SharedChunks chunks;         // keeps media chunks alive (mtmd)
    std::vector<PromptPart> parts;
    int32_t prompt_cells = 0;
    std::vector<ImagePtr> images;  // the request's images, handed back (our encoder reads the pixels)
    bool images_queued = false;    // handed to the vision worker while the request waits
};

struct PromptJob {
    uint64_t key;  // the request's id
    std::string prompt;
    std::vector<ImagePtr> images;
};

// One prompt per pass; the engine is told when every prompt handed over so far is ready, so a
// burst handed over together is admitted in one step, or after 50 ms, so that a burst of images
// that take long to preprocess (clip: ~20 ms each) does not hold back its first requests.
class PromptPrep : public JobThread<PromptJob, PreparedPrompt> {
  public:
    using PrepareFn = std::function<PreparedPrompt(const std::string & prompt, std::vector<ImagePtr> && images)>;
    PromptPrep(PrepareFn prepare, std::function<void()> on_ready)
        : JobThread(
              [prepare = std::move(prepare)](std::vector<PromptJob> & jobs) {
                  std::vector<PreparedPrompt> out;
                  out.push_back(prepare(jobs[0].prompt, std::move(jobs[0].images)));
                  return out;
              },
              std::move(on_ready), std::chrono::milliseconds(50)) {}
};

}  // namespace caprl
