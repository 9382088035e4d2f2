#include "cpu-weights.h"

#include "ggml-backend.h"
#include "gguf-files.h"

#include <cstring>

namespace caprl {

namespace {

bool cpu_offers_amx_buffer() {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("CPU");
    if (!reg || ggml_backend_reg_dev_count(reg) == 0) return false;
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) return false;
    for (ggml_backend_buffer_type_t * b = get_extra(ggml_backend_reg_dev_get(reg, 0)); b && *b; b++) {
        if (strcmp(ggml_backend_buft_name(*b), "AMX") == 0) return true;
    }
    return false;
}

// The quantized types ggml's AMX buffer takes (its qtype_has_amx_kernels).
bool amx_quantized(ggml_type t) {
    switch (t) {
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K:
        case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ4_XS:
            return true;
        default:
            return false;
    }
}

}  // namespace

bool cpu_extra_buffers_safe(const std::string & model_path) {
    if (!cpu_offers_amx_buffer()) return true;
    const bool quantized = find_in_model_files(model_path, [](const std::string &, const gguf_context * g, const ggml_context *) {
        for (int64_t i = 0; i < gguf_get_n_tensors(g); i++) {
            if (amx_quantized(gguf_get_tensor_type(g, i))) return true;
        }
        return false;
    });
    return !quantized;
}

}  // namespace caprl
