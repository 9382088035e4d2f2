// Prepares prompts off the engine thread: tokenization and, for images, mtmd's tokenize (which
// preprocesses every image with llama.cpp's clip: 20-30 ms for a 1036x1036 image on the 2-core
// VM). The engine hands the next waiting requests here before it can admit them, so decoding
// never waits on it, and a request that must wait for KV cells is prepared once, not again at
// every step. The prompt's KV cells are counted here, once, and checked against the context.
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
    Ending error;                // reason kError: refused (a client fault), not admitted
    SharedChunks chunks;         // keeps media chunks alive (mtmd)
    std::vector<PromptPart> parts;
    int32_t prompt_cells = 0;
    std::vector<ImagePtr> images;  // the request's images, handed back (our encoder reads the pixels)
    bool failed() const { return error.reason == FinishReason::kError; }
};

struct PromptJob {
    uint64_t key;  // the request's id
    std::string prompt;
    std::vector<ImagePtr> images;
};

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool add_special, bool parse_special);

// What preparing a prompt reads, all fixed once the engine is built.
struct PromptPrepContext {
    const llama_vocab * vocab = nullptr;
    mtmd_context * mtmd = nullptr;          // null: a text-only model
    bool placeholder_images = false;        // our encoder preprocesses the pixels itself: mtmd plans from the size
};

// Tokenizes the prompt (images through mtmd) and checks it: the prompt-prep thread's work. With
// sizes_only, the images' pixels are not read (an image may be its size alone): mtmd plans the
// same tokens from a placeholder of each image's size (/tokenize's counts).
PreparedPrompt prepare_prompt(const PromptPrepContext & ctx, const std::string & prompt, std::vector<ImagePtr> && images,
                              bool add_special = true, bool sizes_only = false);

// One prompt per pass; the engine is told when every prompt handed over so far is ready, so a
// burst handed over together is admitted in one step, or after 50 ms, so that a burst of images
// that take long to preprocess (clip: ~20 ms each) does not hold back its first requests.
class PromptPrep : public JobThread<PromptJob, PreparedPrompt> {
  public:
    PromptPrep(PromptPrepContext ctx, std::function<void()> on_ready)
        : JobThread(
              [ctx](std::vector<PromptJob> & jobs) {
                  std::vector<PreparedPrompt> out;
                  out.push_back(prepare_prompt(ctx, jobs[0].prompt, std::move(jobs[0].images)));
                  return out;
              },
              std::move(on_ready), std::chrono::milliseconds(50)) {}
};

}  // namespace caprl
