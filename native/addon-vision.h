// The addon's VisionEncoder class: encodes RGB images with our encoder (QwenVisionEncoder) or
// with llama.cpp's clip through mtmd, as the engine would, so tests and benchmarks can compare them.
#pragma once

#include "qwen-vision-encoder.h"

#include <napi.h>

namespace caprl {

Napi::Function vision_encoder_class(Napi::Env env);

// [{ device, host, weightsBytes, computeBytes }]: our encoder's memory, for EngineInfo and VisionEncoder.
Napi::Array vision_memory_to_js(Napi::Env env, const std::vector<QwenVisionEncoder::DeviceBytes> & memory);

}  // namespace caprl
