// Deltaformer on CUDA: for now the device-generic ATen chunk form (cuBLAS matmuls, a loop over chunks); dedicated
// FlashAttention-style kernels are future work.
#ifdef LINFLOW_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "deltaformer/deltaformer.h"

namespace linflow::deltaformer {
namespace {
using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                            const std::optional<Tensor>& beta,
                                                            const std::optional<Tensor>& w,
                                                            const std::optional<Tensor>& cu_seqlens, double scale,
                                                            int64_t chunk_size) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  return fwd_aten(q, k, v, beta, w, cu_seqlens, scale, chunk_size);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
    const std::optional<Tensor>& w, const std::optional<Tensor>& cu_seqlens, const Tensor& o, const Tensor& u,
    const Tensor& r, const Tensor& lse_w, const Tensor& lse_o, const Tensor& grad_o,
    const std::optional<Tensor>& grad_u, double scale, int64_t chunk_size) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  return bwd_aten(q, k, v, beta, w, cu_seqlens, o, u, r, lse_w, lse_o, grad_o, grad_u, scale, chunk_size);
}

}  // namespace
}  // namespace linflow::deltaformer

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("deltaformer_fwd", &linflow::deltaformer::fwd_cuda);
  m.impl("deltaformer_bwd", &linflow::deltaformer::bwd_cuda);
}
#endif  // LINFLOW_WITH_CUDA
