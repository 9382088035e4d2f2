// Where llama.cpp may put a model's weights on the CPU. ggml's CPU backend offers extra buffer
// types that repack weights for faster kernels; on CPUs with AMX one of them is the AMX buffer,
// whose kernels for quantized weights crash at this pin (SIGSEGV in ggml_backend_amx_mul_mat at
// the first decode, in llama-server and llama-mtmd-cli too; llama.cpp issue 20824). Its F16
// kernels work.
#pragma once

#include <string>

namespace caprl {

// False when the CPU backend offers the AMX buffer and the model has weights of a quantized type
// that buffer takes: the model then loads without extra buffer types (llama-server's --no-repack).
bool cpu_extra_buffers_safe(const std::string & model_path);

}  // namespace caprl
