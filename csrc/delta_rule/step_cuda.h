// Delta rule decode step on CUDA (step_cuda.cu): same contract as step_aten, plus padding rows (state_indices[b] < 0:
// the state is left alone and o[b] = 0). fp32 state runs the single-pass kernel (step_kernel.cuh); others, step_aten.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace linflow::delta_rule {
at::Tensor step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                     const std::optional<at::Tensor>& g, at::Tensor state,
                     const std::optional<at::Tensor>& state_indices, double scale);
}  // namespace linflow::delta_rule
