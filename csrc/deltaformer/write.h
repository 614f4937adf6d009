// Deltaformer write pass on CUDA (write_kernel.cu): u, r = P u and lse_w of the write heads, the same values and
// conventions as the u, r, lse_w of fwd_aten (ALGORITHMS.md §3). The caller routes unsupported cases (see
// write_fwd_cuda_supports) to the ATen form.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace linflow::deltaformer {

// True when write_fwd_cuda runs these inputs: CUDA tensors, k / v (/ w) bf16 or fp16 of one dtype, head dims
// K, V in {32, 64, 128}; beta of any float dtype (read as fp32).
bool write_fwd_cuda_supports(const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& beta,
                             const std::optional<at::Tensor>& w);

// k, w [B,T,Hkv,K], v [B,T,Hkv,V], beta [B,T,Hkv] (absent: 1), w absent: w = k; cu_seqlens [N+1] (B == 1) packs
// sequences along T. Returns (u [B,T,Hkv,V] fp32, r [B,T,Hkv,V] fp32, lse_w [B,T,Hkv] fp32); lse_w = 0 on rows
// without earlier keys. The kernel's chunk is 64 rows whatever chunk_size (16 / 32 / 64, validated only): the
// values do not depend on it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> write_fwd_cuda(const at::Tensor& k, const at::Tensor& v,
                                                              const std::optional<at::Tensor>& beta,
                                                              const std::optional<at::Tensor>& w,
                                                              const std::optional<at::Tensor>& cu_seqlens, double scale,
                                                              int64_t chunk_size);

}  // namespace linflow::deltaformer

namespace linflow::deltaformer {

// Write pass backward on CUDA (write_bwd_kernel.cu): same inputs and outputs as the native-layout write_bwd of
// chunk_aten.cpp (dv [B,T,Hkv,V], dbeta [B,T,Hkv], dw, dk [B,T,Hkv,K], fp32; dw is the write query's gradient, dk
// the key side only); u, r, lse_w, du as the forward / read backward give them (fp32). Supported cases as
// write_fwd_cuda_supports.
bool write_bwd_cuda_supports(const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& beta,
                             const std::optional<at::Tensor>& w);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> write_bwd_cuda(
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& u,
    const at::Tensor& r, const at::Tensor& lse_w, const at::Tensor& du, double scale, int64_t chunk_size);

}  // namespace linflow::deltaformer
