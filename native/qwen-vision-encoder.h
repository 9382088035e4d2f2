// Our Qwen2.5-VL vision encoder (issue 8): reads the mmproj GGUF itself and encodes several
// images of any sizes in one ggml graph. Window attention runs as batched attention over the real
// 8x8-patch windows (edge windows padded and masked), not as full attention with a mask as
// llama.cpp's clip does; full attention (every n_wa_pattern-th block) runs per image.
// Output equals clip's for the same RGB image: [n_merged_tokens, n_embd_out] f32, raster order.
#pragma once

#include "types.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace caprl {

class QwenVisionEncoder {
  public:
    // Loads the mmproj (projector qwen2.5vl_merger) on the first GPU when use_gpu and one exists
    // (as mtmd does), else on the CPU with n_threads. Throws std::runtime_error on failure.
    QwenVisionEncoder(const std::string & mmproj, bool use_gpu, int n_threads);
    ~QwenVisionEncoder();

    int32_t n_embd_out() const;
    std::string backend_name() const;

    // The canvas llama.cpp's mtmd resizes an image to (multiples of 28), and the patches (14x14)
    // the encoder runs on; the output has n_patches / 4 rows.
    static void canvas_size(uint32_t w, uint32_t h, int & canvas_w, int & canvas_h);
    static int64_t n_patches(const Image & img);

    // Encodes the images in as few graphs as the capacity allows (max_patches() patches each);
    // out[i] is image i's [n_patches_i / 4, n_embd_out] row-major.
    std::vector<std::vector<float>> encode(const std::vector<const Image *> & images);

    // Where the last encode()'s time went, summed over its graphs, ms: pixels to patches (CPU),
    // building and allocating the graph, copying its inputs to the device, the compute, and
    // reading the embeddings back (and putting them in clip's row order).
    struct Timings {
        double prep = 0, build = 0, upload = 0, compute = 0, download = 0;
    };
    Timings last_timings() const;

    // Patches one graph holds: what reserve() sizes the compute buffers for, and the vision
    // worker's per-pass budget. One largest image (16384 patches) on the CPU or where two would
    // take more than a tenth of the GPU's memory; two on a larger GPU.
    int64_t max_patches() const;

    // Allocates the compute buffers of the largest graph encode() builds, now rather than at the
    // first batch, so the engine can count them before it sizes the KV cache. Later batches reuse
    // them (an image wider than the reserved windows, alone in its graph, may still grow them).
    void reserve();

    // Bytes held per device: weights and compute buffers (0 until reserve() or the first batch).
    struct DeviceBytes {
        std::string device;  // ggml's device name, e.g. "CPU", "CUDA0"
        bool host = false;   // the buffers are in host memory
        uint64_t weights = 0;
        uint64_t compute = 0;
    };
    std::vector<DeviceBytes> memory() const;

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace caprl
