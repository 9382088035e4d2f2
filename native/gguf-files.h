// The files of a (possibly split) GGUF model, in llama.cpp's split naming
// (<prefix>-00001-of-0000N.gguf), each opened with its tensor metadata.
#pragma once

#include "ggml.h"
#include "gguf.h"

#include <functional>
#include <string>

namespace caprl {

// Calls fn with each file of the model, the given (first) one first, its header parsed once and
// its tensors described in `meta`, until fn returns true. Returns whether one did; a file that
// cannot be read is skipped.
using GgufFileFn = std::function<bool(const std::string & path, const gguf_context * g, const ggml_context * meta)>;
bool find_in_model_files(const std::string & model_path, const GgufFileFn & fn);

}  // namespace caprl
