// Deltaformer: argument checks and the device-generic ATen chunk form (chunk_aten.cpp) that serves the CPU and,
// until dedicated kernels land, CUDA. Math: ALGORITHMS.md §3.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace linflow::deltaformer {

struct Shapes {
  int64_t B, T, H, Hkv, K, V, N;  // H query heads, Hkv key/value (write) heads; N sequences
};

// Validates the arguments shared by deltaformer_fwd / deltaformer_bwd and returns the problem sizes.
Shapes check_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& w,
                  const std::optional<at::Tensor>& cu_seqlens, int64_t chunk_size);

// Returns (o [B,T,H,V] in q's dtype, u [B,T,Hkv,V], r = P u [B,T,Hkv,V], lse_w [B,T,Hkv], lse_o [B,T,H]);
// u, r, lse_* in the accumulation dtype (fp32; fp64 for fp64 inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_aten(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& cu_seqlens, double scale, int64_t chunk_size);

// Returns (dq, dk, dv, dbeta, dw); dbeta / dw are empty tensors when beta / w are absent (w absent: w = k, and its
// gradient is part of dk).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_aten(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& o,
    const at::Tensor& u, const at::Tensor& r, const at::Tensor& lse_w, const at::Tensor& lse_o,
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_u, double scale, int64_t chunk_size);

}  // namespace linflow::deltaformer
