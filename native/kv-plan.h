// Sizes the KV cache (one pool of cells shared by all sequences) as vLLM users expect: a token
// count, a byte budget (--kv-cache-memory-bytes) or a fraction of the memory of the device that
// holds it (--gpu-memory-utilization). Costs come from llama.cpp itself: a dry run loads the model
// without allocating (no_alloc) and reports the buffers a context of a given size would take, so
// nothing is guessed per architecture, KV type or backend.
#pragma once

#include "ggml-backend.h"
#include "llama.h"

#include <cstdint>
#include <string>

namespace caprl {

// How the KV cache was sized and what it costs, for EngineInfo and the start-up log.
struct KvCacheReport {
    std::string sized_by;               // "tokens" | "bytes" | "memory-fraction"
    std::string layout;                 // "unified" (one pool) | "per-sequence" (a stream per sequence)
    std::string device;                 // the device holding the KV cache, e.g. "CUDA0" or "CPU"
    bool on_gpu = false;
    uint64_t device_total_bytes = 0;
    uint64_t device_free_bytes = 0;     // before the engine loaded anything
    uint32_t tokens = 0;                // cells
    uint64_t bytes = 0;                 // KV buffers on that device, as allocated
    double bytes_per_token = 0;
    uint64_t compute_bytes = 0;         // llama.cpp's compute buffers on that device
    uint64_t non_kv_bytes = 0;          // weights, vision encoder, runtime (memory-fraction sizing only)
    double memory_fraction = 0;
};

// A discrete or integrated GPU.
bool is_gpu_device(ggml_backend_dev_t dev);

// The device llama.cpp puts the KV cache on: the first GPU when layers are offloaded, else the CPU.
ggml_backend_dev_t kv_cache_device(int32_t n_gpu_layers);

struct DeviceMemory {
    uint64_t free = 0;
    uint64_t total = 0;
};
DeviceMemory device_memory(ggml_backend_dev_t dev);

// What the engine asks for. Exactly one of tokens, bytes, memory_fraction is set.
struct KvCacheRequest {
    uint32_t tokens = 0;          // --kv-cache-tokens
    uint64_t bytes = 0;           // --kv-cache-memory-bytes
    double memory_fraction = 0;    // --gpu-memory-utilization: all of the engine on the device within this share
    uint32_t max_cells = 0;       // more is useless: every sequence at its longest
    uint32_t min_cells = 0;       // one sequence at its longest (--max-model-len)
    std::string model_path;
    uint64_t vision_bytes = 0;    // vision weights and buffers in host memory (counted when the KV cache is there)
};

// Cells for the request. `at_start` is the device's memory before the engine loaded anything,
// `loaded` after the model and the vision encoder (warmed up) are in place; on a GPU their
// difference is what the engine holds besides the KV cache. Fills everything in the report but
// what is known once the context exists (tokens, bytes, bytes_per_token, compute_bytes). Throws with a user-facing reason.
uint32_t plan_kv_cache(const KvCacheRequest & req, const llama_model_params & mp, const llama_context_params & cp,
                       ggml_backend_dev_t dev, DeviceMemory at_start, DeviceMemory loaded, KvCacheReport & report);

// KV and compute bytes on `dev` of a live context.
struct ContextBytes {
    uint64_t kv = 0;
    uint64_t compute = 0;
};
ContextBytes context_bytes(const llama_context * ctx, ggml_backend_dev_t dev);

}  // namespace caprl
