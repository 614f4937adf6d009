// Delta rule decode step on CUDA (step_cuda.cu): the contract of step_aten, plus padding rows: state_indices[b] < 0
// leaves the state alone and writes o[b] = 0 (step_aten rejects negative indices). Indices >= 0 must be distinct (two
// rows naming one slot race) and < N (device-side assert). An fp32 state runs the single-pass kernel
// (step_kernel.cuh); a bf16/fp16 state runs step_aten.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace linflow::delta_rule {
at::Tensor step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                     const std::optional<at::Tensor>& g, at::Tensor state,
                     const std::optional<at::Tensor>& state_indices, double scale);
}  // namespace linflow::delta_rule
