// Rank-R delta rule on CUDA: the device-generic ATen chunk form (cuBLAS batched matmuls) until dedicated kernels
// land; the delta rule's kernels are rank-1 only.
#ifdef LINFLOW_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "flow/flow.h"

namespace linflow::flow {
namespace {
using at::Tensor;

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                    const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                                    const std::optional<Tensor>& cu_seqlens, double scale, bool output_final_state,
                                    c10::string_view form, c10::string_view scan) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  return fwd_aten(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, form, scan);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
    const std::optional<Tensor>& initial_state, const std::optional<Tensor>& cu_seqlens, const Tensor& grad_o,
    const std::optional<Tensor>& grad_final_state, double scale, c10::string_view form, c10::string_view scan) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  return bwd_aten(q, k, v, beta, g, initial_state, cu_seqlens, grad_o, grad_final_state, scale, form, scan);
}

}  // namespace
}  // namespace linflow::flow

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("flow_fwd", &linflow::flow::fwd_cuda);
  m.impl("flow_bwd", &linflow::flow::bwd_cuda);
}
#endif  // LINFLOW_WITH_CUDA
