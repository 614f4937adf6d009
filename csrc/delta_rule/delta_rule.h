// Delta rule: argument checks shared by the CPU and CUDA implementations, and the device-generic ATen chunk
// form (chunk_aten.cpp) that serves the CPU and any case the CUDA kernels do not cover.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace linflow::delta_rule {

struct Shapes {
  int64_t B, T, H, K, V, N;  // N: number of sequences (B, or len(cu_seqlens) - 1)
};

// Validates every argument of delta_rule_fwd/bwd/step and returns the problem sizes.
Shapes check_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& initial_state,
                  const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size);

std::tuple<at::Tensor, at::Tensor> fwd_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& beta, const std::optional<at::Tensor>& g,
                                            const std::optional<at::Tensor>& initial_state,
                                            const std::optional<at::Tensor>& cu_seqlens, double scale,
                                            bool output_final_state, int64_t chunk_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_aten(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
    const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& grad_o,
    const std::optional<at::Tensor>& grad_final_state, double scale, int64_t chunk_size);

}  // namespace linflow::delta_rule

namespace linflow::delta_rule {
void check_step_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                     const std::optional<at::Tensor>& g, const at::Tensor& state,
                     const std::optional<at::Tensor>& state_indices);
at::Tensor step_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                     const std::optional<at::Tensor>& g, at::Tensor state,
                     const std::optional<at::Tensor>& state_indices, double scale);
}  // namespace linflow::delta_rule
