// LION on CUDA, host side: routing, conversions, allocation and the params struct; the launcher (cuda.cu) only runs
// kernels. The forward of mode "chunked" (also "auto" when it resolves to chunked) with bf16/fp16 inputs,
// chunk_size 64 (the kernels' chunk), K <= 128 and at most 65535 sequences runs the register-state sweep kernels
// (kernels.cuh): every decay, both conventions, g_backward, normalize on/off, cu_seqlens, any T and V. Everything
// else takes the device-generic ATen form (lion_aten.cpp): fp32 inputs (their tests expect fp32-accurate results,
// not 16-bit operands), K > 128, modes "full" and "recurrent", other chunk sizes.
// The backward runs the sweep kernels (bwd_kernels below) for the forward kernel's cases with V <= 128, the symmetric
// mask (any decay; not selective "lion_code") and no g_backward; the rest takes the ATen form. LINFLOW_LION_BWD=aten
// (read once) forces ATen everywhere, for A/B measurements.
#ifdef LINFLOW_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "common/alloc.h"
#include "common/env.h"
#include "lion/launch.h"
#include "lion/lion.h"

namespace linflow::lion {
namespace {
using at::Tensor;

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }
bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// LINFLOW_LION_COLUMNS=64|128 fixes the value columns of a sweep block (4 / 8 warps; a tuning knob for benchmarks;
// unset or anything else: sweep_block_columns' rule). Read once.
int block_columns_override() {
  static const int w = [] {
    const int v = env_int("LINFLOW_LION_COLUMNS");
    return (v == 64 || v == 128) ? v : 0;
  }();
  return w;
}

bool use_kernels(const Config& c, const Tensor& q) {
  return c.mode == Mode::chunked && c.chunk_size == chunk::C &&
         (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) && c.K <= 128 && c.N <= 65535;
}

// LINFLOW_LION_BWD=aten: lion_bwd on the ATen form even where the sweep kernels run (A/B). Read once.
bool bwd_kernels_requested() {
  static const bool on = !env_is("LINFLOW_LION_BWD", "aten");
  return on;
}

// The gradient sweeps run the mask M as given (forward sweep: j <= i, backward sweep: j > i), and dk / dv need M^T:
// the same mask only when it is symmetric (gf = gb). Query / key dims of the dq, dk sweeps are V: V <= 128.
bool use_bwd_kernels(const Config& c, const Tensor& q, const std::optional<Tensor>& g_backward) {
  return use_kernels(c, q) && c.V <= 128 && !has(g_backward) &&
         !(c.decay == Decay::selective && c.convention == Convention::lion_code);
}

Tensor fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
                const std::optional<Tensor>& g_backward, const std::optional<Tensor>& lam,
                const std::optional<Tensor>& cu_seqlens, c10::string_view decay, c10::string_view decay_convention,
                bool normalize, double eps, double scale, c10::string_view mode, int64_t chunk_size) {
  const Config c = check_args("lion_fwd", q, k, v, g, g_backward, lam, cu_seqlens, std::string(decay),
                              std::string(decay_convention), normalize, eps, scale, std::string(mode), chunk_size);
  if (!use_kernels(c, q))
    return fwd_aten(q, k, v, g, g_backward, lam, cu_seqlens, decay, decay_convention, normalize, eps, scale, mode,
                    chunk_size);
  if (c.B * c.T == 0) return at::zeros({c.B, c.T, c.H, c.V}, q.options());
  const c10::cuda::CUDAGuard guard(q.device());
  const bool varlen = has(cu_seqlens);
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  Tensor gf, gb, lam_log, cu;
  if (c.decay == Decay::selective) {
    gf = g->to(at::kFloat).contiguous();
    gb = has(g_backward) ? g_backward->to(at::kFloat).contiguous() : gf;
  } else if (c.decay == Decay::fixed) {
    lam_log = lam->to(f32).log().contiguous();
  }
  if (varlen) cu = cu_seqlens->to(at::kLong).contiguous();
  const int64_t slots = chunk::num_slots(varlen, c.T, c.N);
  const int64_t BV = sweep_block_columns(c.V, block_columns_override()), nvt = (c.V + BV - 1) / BV;
  Tensor part = at::empty({slots, c.H, nvt, chunk::C * BV}, f32);
  Tensor den = normalize ? at::empty({slots, c.H, chunk::C}, f32) : Tensor();
  Tensor o = new_output({c.B, c.T, c.H, c.V}, q.options());

  FwdParams p{};
  p.q = qc.data_ptr(); p.k = kc.data_ptr(); p.v = vc.data_ptr();
  p.gf = gf.defined() ? gf.data_ptr<float>() : nullptr;
  p.gb = gb.defined() ? gb.data_ptr<float>() : nullptr;
  p.lam_log = lam_log.defined() ? lam_log.data_ptr<float>() : nullptr;
  p.gf_shift = c.decay == Decay::selective && c.convention == Convention::lion_code;
  p.o = o.data_ptr();
  p.part = part.data_ptr<float>();
  p.den = normalize ? den.data_ptr<float>() : nullptr;
  p.seq = {varlen ? cu.data_ptr<int64_t>() : nullptr, c.T, static_cast<int>(c.N)};
  p.H = static_cast<int>(c.H); p.K = static_cast<int>(c.K); p.V = static_cast<int>(c.V);
  p.scale = static_cast<float>(c.scale);
  p.eps = static_cast<float>(c.eps);
  p.normalize = normalize;
  p.vec_k = c.K % 8 == 0 && aligned16(qc) && aligned16(kc);
  p.vec_v = c.V % 8 == 0 && aligned16(vc);
  p.block_columns = static_cast<int>(BV);
  C10_CUDA_CHECK(launch_forward(p, q.scalar_type() == at::kBFloat16 ? Elem::bf16 : Elem::f16, c.N,
                                at::cuda::getCurrentCUDAStream()));
  return o;
}

// Backward on the sweep kernels (symmetric mask M = M^T; s = scale; G = s dP, dP = dL/dP with P = s ((Q K^T) o M) V'):
//   normalised: o = P / (s D + eps), so G = s dO inv (V columns) and the denominator column's g0 = -s (dO . o) inv,
//     inv = 1 / (s D + eps); one recompute launch pair (forward mode, x = dO) writes G (bf16 / fp16) and g0;
//     unnormalised: G = s dO, run as dO with the gradient sweeps' output scale s (no copy);
//   dv = ((K Q^T) o M) G                    (sweeps of (k, q, G); the forward sweep writes qk_t = q_t . k_t)
//   dq = ((G V^T + g0 1^T) o M) K           (sweeps of (G, v, k), rank-one term a = g0, b = 1; writes
//                                            hv_t = G_t . v_t + g0_t and rq = q . (dqF - dqB))
//   dk = ((V G^T + 1 g0^T) o M) Q           (sweeps of (v, G, q), rank-one term a = 1, b = g0; forms dg)
//   gates (ALGORITHMS.md §4 / lion_aten.cpp full_bwd with h = dA o A): per token t
//     dg_pre_t = q_t . (dqF - dqB)_t + k_t . (dkF - dkB)_t - 2 h_tt,   h_tt = hv_t qk_t,
//     F / B = the forward / backward sweep's part, dg = the per-sequence reverse cumsum of dg_pre (fp32, in the
//     dk launch's backward sweep); fixed decay: d log lam = sum over tokens of dg, dlam = that / lam.
// Returns what bwd_aten returns.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_kernels(
    const Config& c, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
    const std::optional<Tensor>& lam, const std::optional<Tensor>& cu_seqlens, const Tensor& grad_o) {
  const c10::cuda::CUDAGuard guard(q.device());
  const bool varlen = has(cu_seqlens), gated = c.decay != Decay::none;
  const auto st = q.scalar_type();
  const Elem el = st == at::kBFloat16 ? Elem::bf16 : Elem::f16;
  const auto f32 = q.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), dO = grad_o.to(st).contiguous();
  Tensor gf, lam_log, cu;
  if (c.decay == Decay::selective) gf = g->to(at::kFloat).contiguous();
  if (c.decay == Decay::fixed) lam_log = lam->to(f32).log().contiguous();
  if (varlen) cu = cu_seqlens->to(at::kLong).contiguous();
  const int64_t slots = chunk::num_slots(varlen, c.T, c.N);
  Tensor part = at::empty({slots, c.H, chunk::C * 128}, f32);  // one v-tile of at most 128 columns a call
  auto rows = [&] { return at::empty({c.B, c.T, c.H}, f32); };

  auto params = [&](const Tensor& a, const Tensor& b, const Tensor& val, int64_t Dqk, int64_t Dv, double scale,
                    const Tensor& rowx) {
    FwdParams p{};
    p.q = a.data_ptr(); p.k = b.data_ptr(); p.v = val.data_ptr();
    p.gf = p.gb = gf.defined() ? gf.data_ptr<float>() : nullptr;
    p.lam_log = lam_log.defined() ? lam_log.data_ptr<float>() : nullptr;
    p.part = part.data_ptr<float>();
    p.seq = {varlen ? cu.data_ptr<int64_t>() : nullptr, c.T, static_cast<int>(c.N)};
    p.H = static_cast<int>(c.H); p.K = static_cast<int>(Dqk); p.V = static_cast<int>(Dv);
    p.scale = static_cast<float>(scale);
    p.eps = static_cast<float>(c.eps);
    p.vec_k = Dqk % 8 == 0 && aligned16(a) && aligned16(b);
    p.vec_v = Dv % 8 == 0 && aligned16(val) && (!rowx.defined() || aligned16(rowx));
    p.rowx = rowx.defined() ? rowx.data_ptr() : nullptr;
    p.block_columns = sweep_block_columns(Dv);  // one v-tile (Dv <= 128): row dots need every column in the block
    return p;
  };

  Tensor G = dO, g0;
  double gs = c.scale;  // the gradient sweeps' output scale: G = gs * (the tensor passed as G)
  if (c.normalize) {
    Tensor den = at::empty({slots, c.H, chunk::C}, f32);
    G = at::empty_like(dO);
    g0 = rows();
    FwdParams p = params(qc, kc, vc, c.K, c.V, c.scale, dO);
    p.normalize = true;
    p.den = den.data_ptr<float>();
    p.o = G.data_ptr();
    p.rowdot = g0.data_ptr<float>();
    C10_CUDA_CHECK(launch_forward(p, el, c.N, stream));
    gs = 1.0;
  }

  Tensor dq = new_output({c.B, c.T, c.H, c.K}, q.options()), dk = new_output({c.B, c.T, c.H, c.K}, q.options());
  Tensor dv = new_output({c.B, c.T, c.H, c.V}, q.options());
  Tensor qk, hv, rq, R;
  if (gated) qk = rows(), hv = rows(), rq = rows(), R = rows();
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  {
    FwdParams p = params(kc, qc, G, c.K, c.V, gs, Tensor());
    p.o = dv.data_ptr();
    p.diag = ptr(qk);
    C10_CUDA_CHECK(launch_grad_sweeps(p, el, c.N, stream));
  }
  for (int which = 0; which < 2; ++which) {  // 0: dq, 1: dk
    const Tensor x = gated ? (which == 0 ? qc : kc) : Tensor();
    FwdParams p = which == 0 ? params(G, vc, kc, c.V, c.K, gs, x) : params(vc, G, qc, c.V, c.K, gs, x);
    p.o = which == 0 ? dq.data_ptr() : dk.data_ptr();
    if (gated && which == 0) {
      p.rowdot = rq.data_ptr<float>();
      p.diag = hv.data_ptr<float>();
    }
    if (gated && which == 1) {
      p.rq = rq.data_ptr<float>(); p.hv = hv.data_ptr<float>(); p.qk = qk.data_ptr<float>();
      p.dg = R.data_ptr<float>();
    }
    if (c.normalize) {
      p.ext = true;
      (which == 0 ? p.ext_a : p.ext_b) = g0.data_ptr<float>();
    }
    C10_CUDA_CHECK(launch_grad_sweeps(p, el, c.N, stream));
  }

  auto empty = [&] { return at::empty({0}, q.options()); };  // one per output: outputs must not alias
  Tensor dg_out = empty(), dlam_out = empty();
  if (c.decay == Decay::selective) dg_out = R.to(g->scalar_type());
  if (c.decay == Decay::fixed)
    dlam_out = (R.to(at::kDouble).sum(at::IntArrayRef{0, 1}) / lam->to(at::kDouble)).to(lam->scalar_type());
  return {dq, dk, dv, dg_out, empty(), dlam_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
    const std::optional<Tensor>& g_backward, const std::optional<Tensor>& lam, const std::optional<Tensor>& cu_seqlens,
    const Tensor& grad_o, c10::string_view decay, c10::string_view decay_convention, bool normalize, double eps,
    double scale, c10::string_view mode, int64_t chunk_size) {
  if (bwd_kernels_requested()) {
    const Config c = check_args("lion_bwd", q, k, v, g, g_backward, lam, cu_seqlens, std::string(decay),
                                std::string(decay_convention), normalize, eps, scale, std::string(mode), chunk_size);
    if (use_bwd_kernels(c, q, g_backward) && c.B * c.T > 0 && k.scalar_type() == q.scalar_type() &&
        v.scalar_type() == q.scalar_type() && grad_o.dim() == 4 && grad_o.sizes() == v.sizes() &&
        grad_o.device() == q.device())
      return bwd_kernels(c, q, k, v, g, lam, cu_seqlens, grad_o);
  }
  return bwd_aten(q, k, v, g, g_backward, lam, cu_seqlens, grad_o, decay, decay_convention, normalize, eps, scale, mode,
                  chunk_size);
}

}  // namespace
}  // namespace linflow::lion

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("lion_fwd", &linflow::lion::fwd_cuda);
  m.impl("lion_bwd", &linflow::lion::bwd_cuda);
}
#endif  // LINFLOW_WITH_CUDA
