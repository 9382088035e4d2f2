// The addon's VisionEncoder class: encodes RGB images with our encoder (QwenVisionEncoder) or
// with llama.cpp's clip through mtmd, as the engine would, so tests and benchmarks can compare them.
#pragma once

#include <napi.h>

namespace caprl {

Napi::Function vision_encoder_class(Napi::Env env);

}  // namespace caprl
