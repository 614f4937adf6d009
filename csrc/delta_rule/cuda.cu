// Delta rule on CUDA: argument normalisation and launches. bf16/fp16 with chunk_size 64 run the tensor-core chunk
// kernels (kernels.cuh); fp32 inputs and other chunk sizes run the device-generic ATen chunk form.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "delta_rule/delta_rule.h"
#include "delta_rule/kernels.cuh"

namespace linflow::delta_rule {
namespace {
using at::Tensor;

bool use_kernels(const Tensor& q, int64_t chunk_size) {
  return (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) && chunk_size == chunk::C;
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, const FwdParams& p, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, 256, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runtime head dim -> padded compile-time tile (KP) and the matching v-tile width (BV).
template <typename F>
void with_head_tiles(int64_t K, F&& f) {
  if (K <= 64) f(std::integral_constant<int, 64>{}, std::integral_constant<int, 64>{});
  else if (K <= 128) f(std::integral_constant<int, 128>{}, std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 256>{}, std::integral_constant<int, 32>{});
}

template <typename T>
void forward_launch(FwdParams& p, int64_t slots, int64_t N, bool want_output) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_head_tiles(p.K, [&](auto kp, auto bv) {
    constexpr int KP = decltype(kp)::value, BV = decltype(bv)::value;
    const unsigned nv = static_cast<unsigned>((p.V + BV - 1) / BV);
    launch(wy_fwd_kernel<KP, T>, dim3(slots, p.H), WyFwdSmem<KP, T>::carve(nullptr, nullptr), p, stream);
    launch(state_fwd_kernel<KP, BV, T>, dim3(nv, p.H, N), StateFwdSmem<KP, BV, T>::carve(nullptr, nullptr), p, stream);
    if (want_output)
      launch(output_fwd_kernel<KP, BV, T>, dim3(slots, p.H, nv), OutputFwdSmem<KP, BV, T>::carve(nullptr, nullptr), p,
             stream);
  });
}

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                    const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                                    const std::optional<Tensor>& cu_seqlens, double scale, bool output_final_state,
                                    int64_t chunk_size) {
  if (!use_kernels(q, chunk_size))
    return fwd_aten(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, chunk_size);
  const Shapes s = check_args("delta_rule_fwd", q, k, v, beta, g, initial_state, cu_seqlens, chunk_size);
  const c10::cuda::CUDAGuard guard(q.device());
  const bool varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  const bool gated = g.has_value() && g->defined(), has_h0 = initial_state.has_value() && initial_state->defined();
  const int64_t slots = chunk::num_slots(varlen, s.T, s.N);
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  Tensor beta_f = beta.to(at::kFloat).contiguous();
  Tensor g_f = gated ? g->to(at::kFloat).contiguous() : Tensor();
  Tensor h0_f = has_h0 ? initial_state->to(at::kFloat).contiguous() : Tensor();
  Tensor cu64 = varlen ? cu_seqlens->to(at::kLong).contiguous() : Tensor();
  Tensor o = new_output({s.B, s.T, s.H, s.V}, q.options());
  Tensor ht = output_final_state ? new_output({s.N, s.H, s.K, s.V}, f32) : at::empty({0}, f32);
  Tensor w = new_output(k.sizes(), q.options()), u = new_output(v.sizes(), q.options());
  Tensor vn = new_output(v.sizes(), q.options()), h = new_output({slots, s.H, s.K, s.V}, q.options());

  FwdParams p{};
  p.q = qc.data_ptr(); p.k = kc.data_ptr(); p.v = vc.data_ptr();
  p.beta = beta_f.data_ptr<float>(); p.g = gated ? g_f.data_ptr<float>() : nullptr;
  p.h0 = has_h0 ? h0_f.data_ptr<float>() : nullptr;
  p.o = o.data_ptr(); p.w = w.data_ptr(); p.u = u.data_ptr(); p.vn = vn.data_ptr(); p.h = h.data_ptr();
  p.ht = output_final_state ? ht.data_ptr<float>() : nullptr;
  p.seq = {varlen ? cu64.data_ptr<int64_t>() : nullptr, s.T, static_cast<int>(s.N)};
  p.H = s.H; p.K = s.K; p.V = s.V;
  p.scale = static_cast<float>(scale);
  p.vec_k = s.K % 8 == 0 && aligned16(qc) && aligned16(kc);
  p.vec_v = s.V % 8 == 0 && aligned16(vc);
  if (s.B * s.T == 0) {  // nothing to run: the final state is the initial one
    if (output_final_state) has_h0 ? ht.copy_(h0_f) : ht.zero_();
    return {o, ht};
  }
  if (q.scalar_type() == at::kBFloat16) forward_launch<__nv_bfloat16>(p, slots, s.N, true);
  else forward_launch<__half>(p, slots, s.N, true);
  return {o, ht};
}

}  // namespace
}  // namespace linflow::delta_rule

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("delta_rule_fwd", &linflow::delta_rule::fwd_cuda);
  m.impl("delta_rule_bwd", &linflow::delta_rule::bwd_aten);
  m.impl("delta_rule_step", &linflow::delta_rule::step_aten);
}
