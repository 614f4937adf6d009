// Rank-R delta rule on CUDA. The product form (R delta steps per token, in order) is a plain delta rule on the
// interleaved length-T·R sequence, so it runs the delta rule's CUDA path (tensor-core kernels for bf16/fp16):
// R = 1 is delta_rule itself. The simultaneous form (one rank-R update per token) and scan="parallel" run the
// device-generic ATen chunk form (cuBLAS batched matmuls).
#ifdef LINFLOW_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "flow/flow.h"

namespace linflow::flow {
namespace {
using at::Tensor;

bool on_delta_rule_path(const char* op, c10::string_view form, c10::string_view scan) {
  return parse_form(op, std::string(form)) == Form::product && !parse_scan(op, std::string(scan));
}

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                    const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                                    const std::optional<Tensor>& cu_seqlens, double scale, bool output_final_state,
                                    c10::string_view form, c10::string_view scan) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  if (!on_delta_rule_path("flow_fwd", form, scan))
    return fwd_aten(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, form, scan);
  const Shapes s = check_args("flow_fwd", &q, k, v, beta, g, initial_state, cu_seqlens);
  const Interleaved x = interleave(q, k, v, beta, g, cu_seqlens, s.R);
  auto [o, ht] = delta_rule::fwd_cuda(x.q, x.k, x.v, x.beta, x.g, initial_state, x.cu, scale, output_final_state, 64);
  return {take_substep(o, s.R, s.R - 1), ht};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
    const std::optional<Tensor>& initial_state, const std::optional<Tensor>& cu_seqlens, const Tensor& grad_o,
    const std::optional<Tensor>& grad_final_state, double scale, c10::string_view form, c10::string_view scan) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  if (!on_delta_rule_path("flow_bwd", form, scan))
    return bwd_aten(q, k, v, beta, g, initial_state, cu_seqlens, grad_o, grad_final_state, scale, form, scan);
  const Shapes s = check_args("flow_bwd", &q, k, v, beta, g, initial_state, cu_seqlens);
  check_float_tensor("flow_bwd", "grad_o", grad_o, {s.B, s.T, s.H, s.V}, q.device());
  const Interleaved x = interleave(q, k, v, beta, g, cu_seqlens, s.R);
  return deinterleave_grads(delta_rule::bwd_cuda(x.q, x.k, x.v, x.beta, x.g, initial_state, x.cu,
                                                 on_substep(grad_o, s.R, s.R - 1), grad_final_state, scale, 64),
                            k, v, beta, g, s.R);
}

}  // namespace
}  // namespace linflow::flow

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("flow_fwd", &linflow::flow::fwd_cuda);
  m.impl("flow_bwd", &linflow::flow::bwd_cuda);
}
#endif  // LINFLOW_WITH_CUDA
