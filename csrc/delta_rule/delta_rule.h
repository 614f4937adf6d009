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

#ifdef LINFLOW_WITH_CUDA
// The CUDA implementations of delta_rule_fwd / delta_rule_bwd (cuda_host.cpp): tensor-core kernels for bf16/fp16
// at chunk 64, the ATen chunk form otherwise. The flow family runs its product form through them.
std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& beta, const std::optional<at::Tensor>& g,
                                            const std::optional<at::Tensor>& initial_state,
                                            const std::optional<at::Tensor>& cu_seqlens, double scale,
                                            bool output_final_state, int64_t chunk_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
    const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& grad_o,
    const std::optional<at::Tensor>& grad_final_state, double scale, int64_t chunk_size);
#endif

// ---- The chunk form without argument checks, shared with the rank-R (flow) family, which runs it on its
// interleaved length-T·R sequence (csrc/flow/). Inputs are laid out as for delta_rule_fwd/bwd.
struct ChunkOpts {
  int64_t C = 64;      // chunk length in rows
  int64_t block = 1;   // rows per block that all see the same state (A is zero inside a block); C % block == 0
  bool scan = false;   // state pass as a prefix scan of the chunks' affine maps instead of a loop over chunks
};
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> fwd_chunked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& beta, const std::optional<at::Tensor>& g,
                                               const std::optional<at::Tensor>& initial_state,
                                               const std::optional<at::Tensor>& cu_seqlens, double scale,
                                               bool output_final_state, const ChunkOpts& opt);
// grad_final_state: absent or [N, H, K, V] (already validated).
Grads bwd_chunked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& initial_state,
                  const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& grad_o,
                  const std::optional<at::Tensor>& grad_final_state, double scale, const ChunkOpts& opt);

// Every chunk's affine state map S_end = P S_start + Q of a dense batch (k [B, T, H, K], ...): P [B, NC, H, K, K],
// Q [B, NC, H, K, V] in the accumulation dtype. Built from differentiable ATen ops only.
std::pair<at::Tensor, at::Tensor> chunk_transitions(const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                                                    const std::optional<at::Tensor>& g, int64_t C, int64_t block);

// Inclusive prefix composition along dim 1 of affine maps X -> P X + Q (P [..., n, K, K], Q [..., n, K, V]):
// entry c becomes map_c o ... o map_0, with (P2, Q2) o (P1, Q1) = (P2 P1, P2 Q1 + Q2). log2(n) rounds of batched
// matmuls (Hillis-Steele); functional, so autograd can differentiate it.
std::pair<at::Tensor, at::Tensor> affine_prefix_scan(at::Tensor P, at::Tensor Q);

}  // namespace linflow::delta_rule

namespace linflow::delta_rule {
void check_step_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                     const std::optional<at::Tensor>& g, const at::Tensor& state,
                     const std::optional<at::Tensor>& state_indices);
at::Tensor step_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                     const std::optional<at::Tensor>& g, at::Tensor state,
                     const std::optional<at::Tensor>& state_indices, double scale);
}  // namespace linflow::delta_rule
