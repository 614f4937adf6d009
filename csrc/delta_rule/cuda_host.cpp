// Delta rule on CUDA, host side: argument checks, conversions, allocation and the params structs; the launchers
// (cuda.cu, step_cuda.cu) only run kernels. bf16/fp16 with chunk_size 64 take the tensor-core chunk kernels;
// fp32 inputs, other chunk sizes and the backward at K > 128 take the device-generic ATen chunk form.
#ifdef LINFLOW_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/env.h"
#include "delta_rule/delta_rule.h"
#include "delta_rule/launch.h"

namespace linflow::delta_rule {
namespace {
using at::Tensor;

bool use_kernels(const Tensor& q, int64_t chunk_size) {
  return (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) && chunk_size == chunk::C;
}

Elem elem(const Tensor& q) { return q.scalar_type() == at::kBFloat16 ? Elem::bf16 : Elem::f16; }

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// LINFLOW_STATE_WARPS=1|2|4|8 fixes the warps a block of the sequential state passes (a tuning knob for
// benchmarks; unset or anything else: the widest block the value columns fill). Read once.
int state_warps_override() {
  static const int w = [] {
    const int v = env_int("LINFLOW_STATE_WARPS");
    return (v == 1 || v == 2 || v == 4 || v == 8) ? v : 0;
  }();
  return w;
}

// LINFLOW_STATE_MMA=sync runs the mma.sync state passes on Hopper too (A/B against the wgmma ones). Read once.
bool state_mma_sync() {
  static const bool v = env_is("LINFLOW_STATE_MMA", "sync");
  return v;
}

// The decode step runs step_kernel_v2 where it covers the shape (H100, B64 H16 K=V=128 in a CUDA graph: 52.9 us,
// 85% of copy, against 60.1 us for step_kernel); LINFLOW_STEP_KERNEL=v1 forces step_kernel (A/B). Read once.
bool step_kernel_v2() {
  static const bool v = !env_is("LINFLOW_STEP_KERNEL", "v1");
  return v;
}

// The backward runs its dVn / dS pass on a second stream beside the recompute of h (launch_chunk_backward);
// LINFLOW_BWD_STREAMS=1 keeps it on one stream (A/B). Read once.
bool backward_on_two_streams() {
  static const bool v = !env_is("LINFLOW_BWD_STREAMS", "1");
  return v;
}

// Inputs converted for the kernels (contiguous q/k/v, fp32 beta/g/h0, int64 cu_seqlens) and the recomputation
// buffers w, u, vn, h.
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
  p.H = static_cast<int>(s.H); p.K = static_cast<int>(s.K); p.V = static_cast<int>(s.V);
  p.scale = static_cast<float>(scale);
  p.vec_k = s.K % 8 == 0 && aligned16(r.q) && aligned16(r.k);
  p.vec_v = s.V % 8 == 0 && aligned16(r.v);
  p.state_warps = state_warps_override();
  p.state_mma_sync = state_mma_sync();
  return r;
}

}  // namespace

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
  C10_CUDA_CHECK(launch_chunk_forward(r.p, elem(q), r.slots, s.N, true, at::cuda::getCurrentCUDAStream()));
  return {o, ht};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
    const std::optional<Tensor>& initial_state, const std::optional<Tensor>& cu_seqlens, const Tensor& grad_o,
    const std::optional<Tensor>& grad_final_state, double scale, int64_t chunk_size) {
  const Shapes s = check_args("delta_rule_bwd", q, k, v, beta, g, initial_state, cu_seqlens, chunk_size);
  // The chunk-gradient kernel keeps three C x K accumulators in registers: K <= 128 (larger K: the ATen form).
  if (!use_kernels(q, chunk_size) || s.K > 128)
    return bwd_aten(q, k, v, beta, g, initial_state, cu_seqlens, grad_o, grad_final_state, scale, chunk_size);
  check_float_tensor("delta_rule_bwd", "grad_o", grad_o, {s.B, s.T, s.H, s.V}, q.device());
  std::optional<Tensor> dht = grad_final_state;
  if (dht.has_value() && dht->defined() && dht->numel() == 0) dht.reset();
  check_optional_float_tensor("delta_rule_bwd", "grad_final_state", dht, {s.N, s.H, s.K, s.V}, q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const bool gated = g.has_value() && g->defined(), has_h0 = initial_state.has_value() && initial_state->defined();
  const auto f32 = q.options().dtype(at::kFloat);
  Prepared r = prepare(s, q, k, v, beta, g, initial_state, cu_seqlens, scale);
  Tensor dout = grad_o.to(q.scalar_type()).contiguous();
  r.p.vec_v = r.p.vec_v && aligned16(dout);  // dO tiles move in 16-byte pieces too
  Tensor dht_f = dht.has_value() ? dht->to(at::kFloat).contiguous() : Tensor();
  Tensor dq = new_output(q.sizes(), q.options()), dk = new_output(k.sizes(), q.options());
  Tensor dv = new_output(v.sizes(), q.options());
  Tensor dbeta = new_output(beta.sizes(), f32);
  Tensor dg = gated ? new_output(g->sizes(), f32) : Tensor();
  Tensor dh0 = has_h0 ? new_output(initial_state->sizes(), f32) : Tensor();
  Tensor dh = new_output(r.h.sizes(), q.options()), dvn = new_output(v.sizes(), q.options());
  Tensor dvl = new_output(v.sizes(), q.options());
  // Tm, the chunks' (I + diag(beta) A)^-1: stored by the backward's wy_fwd recompute, read by chunk_bwd.
  Tensor tm = new_output({s.B, s.T, s.H, static_cast<int64_t>(chunk::C)}, q.options());
  if (s.B * s.T == 0) {
    if (has_h0) dht_f.defined() ? dh0.copy_(dht_f) : dh0.zero_();
  } else {
    BwdParams b{};
    b.f = r.p;
    b.f.tm = tm.data_ptr();
    b.dout = dout.data_ptr();
    b.dht = dht_f.defined() ? dht_f.data_ptr<float>() : nullptr;
    b.dh = dh.data_ptr(); b.dvn = dvn.data_ptr(); b.dvl = dvl.data_ptr();
    b.dq = dq.data_ptr(); b.dk = dk.data_ptr(); b.dv = dv.data_ptr();
    b.dbeta = dbeta.data_ptr<float>();
    b.dg = gated ? dg.data_ptr<float>() : nullptr;
    b.dh0 = has_h0 ? dh0.data_ptr<float>() : nullptr;
    const cudaStream_t main = at::cuda::getCurrentCUDAStream();
    const cudaStream_t side = backward_on_two_streams() ? at::cuda::getStreamFromPool(false, q.device().index()).stream()
                                                        : main;
    C10_CUDA_CHECK(launch_chunk_backward(b, elem(q), r.slots, s.N, main, side));
  }
  return {dq, dk, dv, dbeta.to(beta.scalar_type()),
          gated ? dg.to(g->scalar_type()) : at::empty({0}, q.options()),
          has_h0 ? dh0.to(initial_state->scalar_type()) : at::empty({0}, q.options())};
}

namespace {

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

// Decode step: an fp32 state cache runs the single-pass kernel; a bf16/fp16 cache runs step_aten. A negative
// state index marks a padding row (state untouched, o = 0); indices >= 0 must be distinct and < N.
Tensor step_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
                 Tensor state, const std::optional<Tensor>& state_indices, double scale) {
  check_step_args(q, k, v, beta, g, state, state_indices);
  if (state.scalar_type() != at::kFloat) return step_aten(q, k, v, beta, g, state, state_indices, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  Tensor o = new_output({B, T, H, V}, q.options());
  if (o.numel() == 0) return o;  // nothing to run; the state is unchanged

  constexpr int64_t int_max = std::numeric_limits<int>::max();
  const int64_t blocks = (V + kStepColumns - 1) / kStepColumns * H * B;
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
  p.v2 = step_kernel_v2();

  C10_CUDA_CHECK(launch_step(p, float_kind("q", q.scalar_type()), blocks, at::cuda::getCurrentCUDAStream()));
  return o;
}


}  // namespace
}  // namespace linflow::delta_rule

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("delta_rule_fwd", &linflow::delta_rule::fwd_cuda);
  m.impl("delta_rule_bwd", &linflow::delta_rule::bwd_cuda);
  m.impl("delta_rule_step", &linflow::delta_rule::step_cuda);
}
#endif  // LINFLOW_WITH_CUDA
