#include "kv-plan.h"

// llama.cpp's staging API for memory queries (what its own --fit uses); pinned with the release.
#include "llama-ext.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace caprl {

bool is_gpu_device(ggml_backend_dev_t dev) {
    const auto type = ggml_backend_dev_type(dev);
    return type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU;
}

namespace {

// Whether buffers of this type live in `dev`'s memory (host buffers count as the CPU's).
bool on_device(ggml_backend_buffer_type_t buft, ggml_backend_dev_t dev) {
    if (!is_gpu_device(dev)) return ggml_backend_buft_is_host(buft);
    return !ggml_backend_buft_is_host(buft) && ggml_backend_buft_get_device(buft) == dev;
}

struct Breakdown {
    uint64_t model = 0, kv = 0, compute = 0;
};

Breakdown breakdown_on(const llama_context * ctx, ggml_backend_dev_t dev) {
    Breakdown b;
    for (const auto & [buft, mb] : llama_get_memory_breakdown(ctx)) {
        if (!on_device(buft, dev)) continue;
        b.model += mb.model;
        b.kv += mb.context;
        b.compute += mb.compute;
    }
    return b;
}

constexpr uint32_t kPad = 256;  // llama.cpp pads n_ctx to a multiple of 256

// What a context costs on a device as a function of its cells: bytes = fixed + per_token * cells.
struct ContextCost {
    double kv_per_token = 0;       // KV buffers
    double kv_fixed = 0;
    double compute_per_token = 0;  // compute buffers (attention scratch grows with the cells)
    double compute_fixed = 0;
    uint64_t weights = 0;          // model weights on the device
};

std::string human_bytes(double bytes) {
    char buf[32];
    if (bytes >= 1024.0 * 1024.0 * 1024.0) snprintf(buf, sizeof(buf), "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
    else snprintf(buf, sizeof(buf), "%.1f MiB", bytes / (1024.0 * 1024.0));
    return buf;
}

std::string fraction_text(double f) {
    char buf[32];
    snprintf(buf, sizeof(buf), "%g", f);
    return buf;
}

}  // namespace

ggml_backend_dev_t kv_cache_device(int32_t n_gpu_layers) {
    if (n_gpu_layers != 0) {
        for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (is_gpu_device(dev)) return dev;
        }
    }
    return ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
}

DeviceMemory device_memory(ggml_backend_dev_t dev) {
    size_t free = 0, total = 0;
    if (dev) ggml_backend_dev_memory(dev, &free, &total);
    return {free, total};
}

static ContextCost measure_context_cost(const std::string & model_path, llama_model_params mp, llama_context_params cp,
                                 ggml_backend_dev_t dev) {
    mp.no_alloc = true;
    mp.load_mode = LLAMA_LOAD_MODE_NONE;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) throw std::runtime_error("failed to read " + model_path + " to size the KV cache");

    // Two sizes give the per-cell and fixed parts of the KV and compute buffers.
    const uint32_t sizes[2] = {4 * 1024, 16 * 1024};
    Breakdown at[2];
    for (int k = 0; k < 2; k++) {
        cp.n_ctx = sizes[k];
        llama_context * ctx = llama_init_from_model(model, cp);
        if (!ctx) {
            llama_model_free(model);
            throw std::runtime_error("failed to size the KV cache (dry run of a " + std::to_string(sizes[k]) + "-token context)");
        }
        at[k] = breakdown_on(ctx, dev);
        llama_free(ctx);
    }
    llama_model_free(model);

    ContextCost c;
    const double dn = (double) (sizes[1] - sizes[0]);
    c.kv_per_token = ((double) at[1].kv - (double) at[0].kv) / dn;
    c.kv_fixed = std::max(0.0, (double) at[0].kv - c.kv_per_token * sizes[0]);
    c.compute_per_token = std::max(0.0, ((double) at[1].compute - (double) at[0].compute) / dn);
    c.compute_fixed = std::max(0.0, (double) at[0].compute - c.compute_per_token * sizes[0]);
    c.weights = at[0].model;
    if (!(c.kv_per_token > 0)) throw std::runtime_error("could not measure the KV cache's bytes per token on this device");
    return c;
}

static uint32_t cells_for_budget(const ContextCost & cost, double budget_bytes, bool count_compute) {
    const double fixed = cost.kv_fixed + (count_compute ? cost.compute_fixed : 0.0);
    const double per = cost.kv_per_token + (count_compute ? cost.compute_per_token : 0.0);
    const double n = std::floor((budget_bytes - fixed) / per);
    if (!(n >= kPad)) return 0;
    const double capped = std::min(n, (double) (UINT32_MAX - kPad));
    return (uint32_t) capped / kPad * kPad;
}

uint32_t plan_kv_cache(const KvCacheRequest & req, const llama_model_params & mp, const llama_context_params & cp,
                       ggml_backend_dev_t dev, DeviceMemory at_start, DeviceMemory loaded, KvCacheReport & report) {
    report = KvCacheReport{};
    report.device = dev ? ggml_backend_dev_name(dev) : "CPU";
    report.on_gpu = dev && is_gpu_device(dev);
    report.device_total_bytes = at_start.total;
    report.device_free_bytes = at_start.free;
    const uint32_t max_cells = (req.max_cells + kPad - 1) / kPad * kPad;
    if (req.tokens > 0) {
        report.sized_by = "tokens";
        return req.tokens;
    }

    const ContextCost cost = measure_context_cost(req.model_path, mp, cp, dev);
    uint32_t cells = 0;
    if (req.bytes > 0) {
        report.sized_by = "bytes";
        cells = cells_for_budget(cost, (double) req.bytes, false);
        if (cells < req.min_cells) {
            throw std::runtime_error("--kv-cache-memory-bytes " + std::to_string(req.bytes) + " holds " + std::to_string(cells) +
                                     " tokens, fewer than one request of --max-model-len " + std::to_string(req.min_cells) +
                                     " needs (" + human_bytes(cost.kv_fixed + cost.kv_per_token * req.min_cells) +
                                     "): raise it or lower --max-model-len");
        }
    } else {
        report.sized_by = "memory-fraction";
        report.memory_fraction = req.memory_fraction;
        const double wanted = (double) req.memory_fraction * (double) at_start.total;
        if (wanted > (double) at_start.free) {
            // As vLLM: the share asked for must be free when the engine starts.
            throw std::runtime_error("free memory on " + report.device + " at start-up (" + human_bytes((double) at_start.free) + " of " +
                                     human_bytes((double) at_start.total) + ") is less than --gpu-memory-utilization " +
                                     fraction_text(req.memory_fraction) + " asks for (" + human_bytes(wanted) +
                                     "): lower it, or free memory used by other processes");
        }
        // What the engine holds besides the KV cache. On a GPU, what its memory lost while the model
        // and the vision encoder loaded (weights, vision buffers, runtime). In host memory that
        // figure would miss mmap'd weights and count other processes, so take the sizes instead.
        const uint64_t dropped = at_start.free > loaded.free ? at_start.free - loaded.free : 0;
        report.non_kv_bytes = report.on_gpu ? std::max<uint64_t>(dropped, cost.weights) : cost.weights + req.vision_bytes;
        cells = cells_for_budget(cost, wanted - (double) report.non_kv_bytes, true);
        if (cells < req.min_cells) {
            const double need = cost.kv_fixed + cost.compute_fixed + (cost.kv_per_token + cost.compute_per_token) * req.min_cells;
            throw std::runtime_error("one request of --max-model-len " + std::to_string(req.min_cells) + " needs " + human_bytes(need) +
                                     " of KV cache and compute buffers on " + report.device + ", more than the " +
                                     human_bytes(std::max(0.0, wanted - (double) report.non_kv_bytes)) + " left of --gpu-memory-utilization " +
                                     fraction_text(req.memory_fraction) + " x " + human_bytes((double) at_start.total) + " after " +
                                     human_bytes((double) report.non_kv_bytes) + " of weights: raise --gpu-memory-utilization or lower --max-model-len");
        }
    }
    return std::min(cells, std::max(max_cells, req.min_cells));
}

ContextBytes context_bytes(const llama_context * ctx, ggml_backend_dev_t dev) {
    const Breakdown b = breakdown_on(ctx, dev);
    return {b.kv, b.compute};
}

}  // namespace caprl
