// Delta rule decode step on CUDA: argument checks, the params struct and one launch of step_kernel
// (step_kernel.cuh). Template parameters: q's dtype and the rows per thread R (head dim K <= 32 R): 12 instantiations.
// A non-fp32 state (which the op allows) runs step_aten instead.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "common/alloc.h"
#include "delta_rule/delta_rule.h"
#include "delta_rule/step_cuda.h"
#include "delta_rule/step_kernel.cuh"

namespace linflow::delta_rule {
namespace {
using at::Tensor;

FloatKind float_kind(const char* name, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatKind::f32;
    case at::kBFloat16: return FloatKind::bf16;
    case at::kHalf: return FloatKind::f16;
    default: TORCH_CHECK(false, "delta_rule_step: ", name, " must be float32, bfloat16 or float16 on CUDA, got ", t);
  }
}

template <size_t D>
void copy_strides(int64_t (&dst)[D], const Tensor& t) {
  for (size_t d = 0; d < D; ++d) dst[d] = t.stride(static_cast<int64_t>(d));
}

template <typename T>
void launch(const StepParams& p, int64_t blocks, cudaStream_t stream) {
  auto run = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), step::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (step::rows_per_thread(p.K)) {
    case 1: run(step_kernel<1, T>); break;
    case 2: run(step_kernel<2, T>); break;
    case 4: run(step_kernel<4, T>); break;
    default: run(step_kernel<8, T>); break;
  }
}

}  // namespace

Tensor step_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
                 Tensor state, const std::optional<Tensor>& state_indices, double scale) {
  check_step_args(q, k, v, beta, g, state, state_indices);
  if (state.scalar_type() != at::kFloat) return step_aten(q, k, v, beta, g, state, state_indices, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  Tensor o = new_output({B, T, H, V}, q.options());
  if (o.numel() == 0) return o;  // nothing to run; the state is unchanged

  constexpr int64_t int_max = std::numeric_limits<int>::max();
  const int64_t blocks = (V + step::BV - 1) / step::BV * H * B;
  TORCH_CHECK(T <= int_max && blocks <= int_max, "delta_rule_step: B = ", B, ", T = ", T, ", H = ", H,
              " is too large for one launch (T and ceil(V / 32) * H * B must fit in int32)");
  const bool gated = g.has_value() && g->defined();
  const bool indexed = state_indices.has_value() && state_indices->defined();

  StepParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.beta = beta.data_ptr(); p.g = gated ? g->data_ptr() : nullptr;
  p.state_indices = indexed ? state_indices->data_ptr() : nullptr;
  p.state = state.data_ptr<float>();
  p.o = o.data_ptr();
  copy_strides(p.q_stride, q); copy_strides(p.k_stride, k); copy_strides(p.v_stride, v);
  copy_strides(p.beta_stride, beta);
  if (gated) copy_strides(p.g_stride, *g);
  p.idx_stride = indexed ? state_indices->stride(0) : 0;
  p.idx64 = indexed && state_indices->scalar_type() == at::kLong;
  p.N = state.size(0);
  p.B = static_cast<int>(B); p.T = static_cast<int>(T); p.H = static_cast<int>(H);
  p.K = static_cast<int>(K); p.V = static_cast<int>(V);
  p.scale = static_cast<float>(scale);
  p.beta_kind = float_kind("beta", beta.scalar_type());
  p.g_kind = gated ? float_kind("g", g->scalar_type()) : FloatKind::f32;
  p.vec_state = V % 4 == 0 && reinterpret_cast<uintptr_t>(p.state) % 16 == 0;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (q.scalar_type()) {
    case at::kFloat: launch<float>(p, blocks, stream); break;
    case at::kBFloat16: launch<__nv_bfloat16>(p, blocks, stream); break;
    case at::kHalf: launch<__half>(p, blocks, stream); break;
    default: TORCH_CHECK(false, "delta_rule_step: q must be float32, bfloat16 or float16 on CUDA, got ", q.scalar_type());
  }
  return o;
}

}  // namespace linflow::delta_rule
