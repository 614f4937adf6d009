// Delta rule on CUDA: argument normalisation and launches. bf16/fp16 with chunk_size 64 run the tensor-core chunk
// kernels (kernels.cuh); fp32 inputs and other chunk sizes run the device-generic ATen chunk form.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "delta_rule/delta_rule.h"
#include "delta_rule/kernels.cuh"
#include "delta_rule/kernels_bwd.cuh"
#include "delta_rule/step_cuda.h"

namespace linflow::delta_rule {
namespace {
using at::Tensor;

bool use_kernels(const Tensor& q, int64_t chunk_size) {
  return (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) && chunk_size == chunk::C;
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

template <typename Kernel, typename Params>
void launch(Kernel kernel, dim3 grid, size_t smem, const Params& p, cudaStream_t stream) {
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

// Inputs converted for the kernels: contiguous q/k/v, fp32 beta/g/h0, int64 cu_seqlens; recomputation buffers.
struct Prepared {
  Tensor q, k, v, beta, g, h0, cu, w, u, vn, h;
  FwdParams p{};
  int64_t slots = 0;
};

Prepared prepare(const Shapes& s, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                 const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                 const std::optional<Tensor>& cu_seqlens, double scale) {
  Prepared r;
  const bool varlen = cu_seqlens.has_value() && cu_seqlens->defined();
  const bool gated = g.has_value() && g->defined(), has_h0 = initial_state.has_value() && initial_state->defined();
  r.slots = chunk::num_slots(varlen, s.T, s.N);
  r.q = q.contiguous(); r.k = k.contiguous(); r.v = v.contiguous();
  r.beta = beta.to(at::kFloat).contiguous();
  if (gated) r.g = g->to(at::kFloat).contiguous();
  if (has_h0) r.h0 = initial_state->to(at::kFloat).contiguous();
  if (varlen) r.cu = cu_seqlens->to(at::kLong).contiguous();
  r.w = new_output(k.sizes(), q.options());
  r.u = new_output(v.sizes(), q.options());
  r.vn = new_output(v.sizes(), q.options());
  r.h = new_output({r.slots, s.H, s.K, s.V}, q.options());
  FwdParams& p = r.p;
  p.q = r.q.data_ptr(); p.k = r.k.data_ptr(); p.v = r.v.data_ptr();
  p.beta = r.beta.data_ptr<float>(); p.g = gated ? r.g.data_ptr<float>() : nullptr;
  p.h0 = has_h0 ? r.h0.data_ptr<float>() : nullptr;
  p.w = r.w.data_ptr(); p.u = r.u.data_ptr(); p.vn = r.vn.data_ptr(); p.h = r.h.data_ptr();
  p.seq = {varlen ? r.cu.data_ptr<int64_t>() : nullptr, s.T, static_cast<int>(s.N)};
  p.H = s.H; p.K = s.K; p.V = s.V;
  p.scale = static_cast<float>(scale);
  p.vec_k = s.K % 8 == 0 && aligned16(r.q) && aligned16(r.k);
  p.vec_v = s.V % 8 == 0 && aligned16(r.v);
  return r;
}

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                    const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                                    const std::optional<Tensor>& cu_seqlens, double scale, bool output_final_state,
                                    int64_t chunk_size) {
  if (!use_kernels(q, chunk_size))
    return fwd_aten(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, chunk_size);
  const Shapes s = check_args("delta_rule_fwd", q, k, v, beta, g, initial_state, cu_seqlens, chunk_size);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  Prepared r = prepare(s, q, k, v, beta, g, initial_state, cu_seqlens, scale);
  Tensor o = new_output({s.B, s.T, s.H, s.V}, q.options());
  Tensor ht = output_final_state ? new_output({s.N, s.H, s.K, s.V}, f32) : at::empty({0}, f32);
  r.p.o = o.data_ptr();
  r.p.ht = output_final_state ? ht.data_ptr<float>() : nullptr;
  if (s.B * s.T == 0) {  // nothing to run: the final state is the initial one
    if (output_final_state) r.h0.defined() ? ht.copy_(r.h0) : ht.zero_();
    return {o, ht};
  }
  if (q.scalar_type() == at::kBFloat16) forward_launch<__nv_bfloat16>(r.p, r.slots, s.N, true);
  else forward_launch<__half>(r.p, r.slots, s.N, true);
  return {o, ht};
}

template <typename T>
void backward_launch(BwdParams& b, int64_t slots, int64_t N) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_head_tiles(b.f.K, [&](auto kp, auto bv) {
    constexpr int KP = decltype(kp)::value, BV = decltype(bv)::value;
    if constexpr (KP <= 128) {
      const unsigned nv = static_cast<unsigned>((b.f.V + BV - 1) / BV);
      launch(state_bwd_kernel<KP, BV, T>, dim3(nv, b.f.H, N), StateBwdSmem<KP, BV, T>::carve(nullptr, nullptr), b,
             stream);
      launch(chunk_bwd_kernel<KP, T>, dim3(slots, b.f.H), ChunkBwdSmem<KP, T>::carve(nullptr, nullptr), b, stream);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
    const std::optional<Tensor>& initial_state, const std::optional<Tensor>& cu_seqlens, const Tensor& grad_o,
    const std::optional<Tensor>& grad_final_state, double scale, int64_t chunk_size) {
  // The chunk-gradient kernel keeps three C x K accumulators in registers: K <= 128 (larger K: ATen form).
  if (!use_kernels(q, chunk_size) || q.size(-1) > 128)
    return bwd_aten(q, k, v, beta, g, initial_state, cu_seqlens, grad_o, grad_final_state, scale, chunk_size);
  const Shapes s = check_args("delta_rule_bwd", q, k, v, beta, g, initial_state, cu_seqlens, chunk_size);
  check_float_tensor("delta_rule_bwd", "grad_o", grad_o, {s.B, s.T, s.H, s.V}, q.device());
  std::optional<Tensor> dht = grad_final_state;
  if (dht.has_value() && dht->defined() && dht->numel() == 0) dht.reset();
  check_optional_float_tensor("delta_rule_bwd", "grad_final_state", dht, {s.N, s.H, s.K, s.V}, q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const bool gated = g.has_value() && g->defined(), has_h0 = initial_state.has_value() && initial_state->defined();
  const auto f32 = q.options().dtype(at::kFloat);
  Prepared r = prepare(s, q, k, v, beta, g, initial_state, cu_seqlens, scale);
  Tensor dout = grad_o.to(q.scalar_type()).contiguous();
  Tensor dht_f = dht.has_value() ? dht->to(at::kFloat).contiguous() : Tensor();
  Tensor dq = new_output(q.sizes(), q.options()), dk = new_output(k.sizes(), q.options());
  Tensor dv = new_output(v.sizes(), q.options());
  Tensor dbeta = new_output(beta.sizes(), f32);
  Tensor dg = gated ? new_output(g->sizes(), f32) : Tensor();
  Tensor dh0 = has_h0 ? new_output(initial_state->sizes(), f32) : Tensor();
  Tensor dh = new_output(r.h.sizes(), q.options()), dvn = new_output(v.sizes(), q.options());
  if (s.B * s.T == 0) {
    if (has_h0) dht_f.defined() ? dh0.copy_(dht_f) : dh0.zero_();
  } else {
    BwdParams b{};
    b.f = r.p;
    b.dout = dout.data_ptr();
    b.dht = dht_f.defined() ? dht_f.data_ptr<float>() : nullptr;
    b.dh = dh.data_ptr(); b.dvn = dvn.data_ptr();
    b.dq = dq.data_ptr(); b.dk = dk.data_ptr(); b.dv = dv.data_ptr();
    b.dbeta = dbeta.data_ptr<float>();
    b.dg = gated ? dg.data_ptr<float>() : nullptr;
    b.dh0 = has_h0 ? dh0.data_ptr<float>() : nullptr;
    if (q.scalar_type() == at::kBFloat16) {
      forward_launch<__nv_bfloat16>(b.f, r.slots, s.N, false);
      backward_launch<__nv_bfloat16>(b, r.slots, s.N);
    } else {
      forward_launch<__half>(b.f, r.slots, s.N, false);
      backward_launch<__half>(b, r.slots, s.N);
    }
  }
  return {dq, dk, dv, dbeta.to(beta.scalar_type()),
          gated ? dg.to(g->scalar_type()) : at::empty({0}, q.options()),
          has_h0 ? dh0.to(initial_state->scalar_type()) : at::empty({0}, q.options())};
}

}  // namespace
}  // namespace linflow::delta_rule

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("delta_rule_fwd", &linflow::delta_rule::fwd_cuda);
  m.impl("delta_rule_bwd", &linflow::delta_rule::bwd_cuda);
  m.impl("delta_rule_step", &linflow::delta_rule::step_cuda);
}
