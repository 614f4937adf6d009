// Rank-R delta rule (ParallelFlow / DeltaProduct, ALGORITHMS.md §2): argument checks and the ATen form shared by
// the CPU and CUDA registrations. Both forms run the delta rule's chunk form (delta_rule/chunk_aten.cpp) on the
// interleaved length-T·R sequence; CUDA runs this ATen form until dedicated kernels land.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <tuple>

#include "delta_rule/delta_rule.h"

namespace linflow::flow {

struct Shapes {
  int64_t B, T, R, H, K, V, N;  // N: number of sequences (B, or len(cu_seqlens) - 1)
};

enum class Form { product, simultaneous };

Form parse_form(const char* op, const std::string& form);
// "parallel" -> true; "sequential" and "auto" (sequential until the crossover is measured on the GPU) -> false.
bool parse_scan(const char* op, const std::string& scan);

// k [B, T, R, H, K], v [B, T, R, H, V], beta [B, T, R, H], g [B, T, H]; q [B, T, H, K] when `q` is given.
Shapes check_args(const char* op, const at::Tensor* q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& initial_state,
                  const std::optional<at::Tensor>& cu_seqlens);

std::tuple<at::Tensor, at::Tensor> fwd_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& beta, const std::optional<at::Tensor>& g,
                                            const std::optional<at::Tensor>& initial_state,
                                            const std::optional<at::Tensor>& cu_seqlens, double scale,
                                            bool output_final_state, c10::string_view form, c10::string_view scan);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_aten(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
    const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& grad_o,
    const std::optional<at::Tensor>& grad_final_state, double scale, c10::string_view form, c10::string_view scan);

// ---- The rank-R problem as a rank-1 delta rule on the interleaved length-T·R sequence (see flow_aten.cpp).
struct Interleaved {
  at::Tensor q, k, v, beta;
  std::optional<at::Tensor> g, cu;
};
Interleaved interleave(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                       const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& cu_seqlens, int64_t R);
// [B, T, ...] placed on sub-step j of each token of [B, T·R, ...] (zeros elsewhere), and the inverse.
at::Tensor on_substep(const at::Tensor& x, int64_t R, int64_t j);
at::Tensor take_substep(const at::Tensor& x, int64_t R, int64_t j);
// The delta rule's gradients of the interleaved problem -> gradients of (q, k, v, beta, g, initial_state).
delta_rule::Grads deinterleave_grads(delta_rule::Grads grads, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& beta, const std::optional<at::Tensor>& g, int64_t R);

// Per-segment affine state maps (P, Q) (composite of differentiable ATen ops: autograd comes for free).
std::tuple<at::Tensor, at::Tensor> transition(const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                                              const std::optional<at::Tensor>& g, c10::string_view form,
                                              int64_t segment);

}  // namespace linflow::flow
