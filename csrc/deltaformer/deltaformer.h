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

// bwd_aten's argument checks (check_args plus the saved tensors and cotangents); `du` = grad_u, reset when empty.
Shapes check_bwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& w,
                      const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& o, const at::Tensor& u,
                      const at::Tensor& r, const at::Tensor& lse_w, const at::Tensor& lse_o, const at::Tensor& grad_o,
                      const std::optional<at::Tensor>& grad_u, int64_t chunk_size, std::optional<at::Tensor>& du);

// The two passes on their own, native layout, ATen chunk form (arguments as checked by check_args).
// Write pass: (u [B,T,Hkv,V], r [B,T,Hkv,V], lse_w [B,T,Hkv]) in the accumulation dtype, as fwd_aten returns them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> write_fwd(const at::Tensor& k, const at::Tensor& v,
                                                         const std::optional<at::Tensor>& beta,
                                                         const std::optional<at::Tensor>& w,
                                                         const std::optional<at::Tensor>& cu_seqlens, double scale,
                                                         int64_t chunk_size);
// Write pass backward from du = dL/du (all of it: read pass and grad_u): (dv [B,T,Hkv,V], dbeta [B,T,Hkv],
// dw [B,T,Hkv,K] (gradient of the write query: w, or k when w is absent), dk [B,T,Hkv,K] (key side only)), in the
// accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_bwd(
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& u,
    const at::Tensor& r, const at::Tensor& lse_w, const at::Tensor& du, double scale, int64_t chunk_size);

#ifdef LINFLOW_WITH_CUDA
// Read pass kernels (read_kernel.cu, host side in cuda_host.cpp): q, k bf16 / fp16, K and V multiples of 8 up to
// 128 (read_kernels_support), u fp32. Same meaning as the ATen read pass:
//   (o [B,T,H,V] in q's dtype, lse_o [B,T,H] fp32 (natural log, scale included))
std::tuple<at::Tensor, at::Tensor> read_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& u,
                                                 const std::optional<at::Tensor>& cu_seqlens, double scale);
//   (dq [B,T,H,K], dk [B,T,Hkv,K], du [B,T,Hkv,V]) fp32; dk, du summed over the query heads of each group
std::tuple<at::Tensor, at::Tensor, at::Tensor> read_bwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& u, const at::Tensor& o,
                                                             const at::Tensor& lse_o, const at::Tensor& grad_o,
                                                             const std::optional<at::Tensor>& cu_seqlens,
                                                             double scale);
bool read_kernels_support(const at::Tensor& q, int64_t K, int64_t V);
#endif

}  // namespace linflow::deltaformer
