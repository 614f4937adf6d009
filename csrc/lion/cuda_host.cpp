// LION on CUDA, host side: routing, conversions, allocation and the params struct; the launcher (cuda.cu) only runs
// kernels. The forward of mode "chunked" (also "auto" when it resolves to chunked) with bf16/fp16 inputs,
// chunk_size 64 (the kernels' chunk), K <= 128 and at most 65535 sequences runs the register-state sweep kernels
// (kernels.cuh): every decay, both conventions, g_backward, normalize on/off, cu_seqlens, any T and V. Everything
// else takes the device-generic ATen form (lion_aten.cpp): fp32 inputs (their tests expect fp32-accurate results,
// not 16-bit operands), K > 128, modes "full" and "recurrent", other chunk sizes, and the whole backward.
#ifdef LINFLOW_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>

#include "common/alloc.h"
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
    const char* e = std::getenv("LINFLOW_LION_COLUMNS");
    const int v = e ? std::atoi(e) : 0;
    return (v == 64 || v == 128) ? v : 0;
  }();
  return w;
}

bool use_kernels(const Config& c, const Tensor& q) {
  return c.mode == Mode::chunked && c.chunk_size == chunk::C &&
         (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) && c.K <= 128 && c.N <= 65535;
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

}  // namespace
}  // namespace linflow::lion

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("lion_fwd", &linflow::lion::fwd_cuda);
  m.impl("lion_bwd", &linflow::lion::bwd_aten);
}
#endif  // LINFLOW_WITH_CUDA
