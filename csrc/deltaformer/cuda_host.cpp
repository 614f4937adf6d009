// Deltaformer on CUDA, host side. bf16 / fp16 inputs with K, V multiples of 8 up to 128 run four stages, one
// function each:
//   forward:  write_fwd_cuda (write_kernel.cu)      -> u, r, lse_w   (K, V in {32, 64, 128}; else the ATen
//             write_fwd; LINFLOW_DELTAFORMER_WRITE=aten forces it, for A/B measurements)
//             read_fwd_cuda (read_kernel.cu)        -> o, lse_o
//   backward: read_bwd_cuda (read_kernel.cu)        -> dq, dk (read side), du;  du += grad_u
//             write_bwd_cuda (write_bwd_kernel.cu)  -> dv, dbeta, dw, dk (write side) (K, V in {32, 64, 128}; else
//             the ATen write_bwd; LINFLOW_DELTAFORMER_WRITE_BWD=aten forces it, for A/B measurements)
// Everything else (fp32 inputs, other head dims, empty inputs) takes the ATen chunk form end to end, as before.
#ifdef LINFLOW_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "common/env.h"
#include "deltaformer/deltaformer.h"
#include "deltaformer/read.h"
#include "deltaformer/write.h"

namespace linflow::deltaformer {
using at::Tensor;

bool read_kernels_support(const Tensor& q, int64_t K, int64_t V) {
  return (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) && K % 8 == 0 && V % 8 == 0 &&
         K <= kReadMaxDim && V <= kReadMaxDim;
}

namespace {

bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Contiguous in `dtype`, 16-byte aligned (the kernels move rows in 16-byte pieces).
Tensor kernel_operand(const Tensor& x, at::ScalarType dtype) {
  Tensor t = x.to(dtype).contiguous();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

// Operands (q, k, u in q's dtype; int64 cu_seqlens) and the forward parameters (outputs not set).
struct ReadInputs {
  Tensor q, k, u, cu;
  ReadFwdParams p{};
  int64_t slots = 0;
};

ReadInputs read_inputs(const Tensor& q, const Tensor& k, const Tensor& u, const std::optional<Tensor>& cu_seqlens,
                       double scale) {
  TORCH_CHECK(read_kernels_support(q, q.size(3), u.size(3)), "deltaformer read kernels: unsupported dtype ",
              q.scalar_type(), " or head dims K = ", q.size(3), ", V = ", u.size(3));
  ReadInputs r;
  const bool varlen = present(cu_seqlens);
  const int64_t B = q.size(0), T = q.size(1), N = varlen ? cu_seqlens->size(0) - 1 : B;
  r.q = kernel_operand(q, q.scalar_type());
  r.k = kernel_operand(k, q.scalar_type());
  r.u = kernel_operand(u, q.scalar_type());  // u is fp32: the kernels read 16-bit operands
  if (varlen) r.cu = cu_seqlens->to(at::kLong).contiguous();
  r.slots = chunk::num_slots(varlen, T, N);
  ReadFwdParams& p = r.p;
  p.q = r.q.data_ptr(); p.k = r.k.data_ptr(); p.u = r.u.data_ptr();
  p.seq = {varlen ? r.cu.data_ptr<int64_t>() : nullptr, T, static_cast<int>(N)};
  p.H = static_cast<int>(q.size(2)); p.Hkv = static_cast<int>(k.size(2));
  p.K = static_cast<int>(q.size(3)); p.V = static_cast<int>(u.size(3));
  p.scale = static_cast<float>(scale);
  return r;
}

ReadElem read_elem(const Tensor& q) { return q.scalar_type() == at::kBFloat16 ? ReadElem::bf16 : ReadElem::f16; }

}  // namespace

std::tuple<Tensor, Tensor> read_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& u,
                                         const std::optional<Tensor>& cu_seqlens, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  ReadInputs r = read_inputs(q, k, u, cu_seqlens, scale);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), V = u.size(3);
  Tensor o = new_output({B, T, H, V}, q.options());
  Tensor lse = new_output({B, T, H}, q.options().dtype(at::kFloat));
  r.p.o = o.data_ptr();
  r.p.lse = lse.data_ptr<float>();
  C10_CUDA_CHECK(launch_read_fwd(r.p, read_elem(q), r.slots, at::cuda::getCurrentCUDAStream()));
  return {o, lse};
}

std::tuple<Tensor, Tensor, Tensor> read_bwd_cuda(const Tensor& q, const Tensor& k, const Tensor& u, const Tensor& o,
                                                 const Tensor& lse_o, const Tensor& grad_o,
                                                 const std::optional<Tensor>& cu_seqlens, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  ReadInputs r = read_inputs(q, k, u, cu_seqlens, scale);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Hkv = k.size(2), K = q.size(3), V = u.size(3);
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor oc = kernel_operand(o, q.scalar_type()), dout = kernel_operand(grad_o, q.scalar_type());
  Tensor lse = lse_o.to(at::kFloat).contiguous();
  Tensor drow = new_output({B, T, H}, f32);
  Tensor dq = at::zeros({B, T, H, K}, f32);  // accumulated by atomics
  Tensor dk = new_output({B, T, Hkv, K}, f32), du = new_output({B, T, Hkv, V}, f32);
  ReadBwdParams b{};
  b.f = r.p;
  b.f.o = oc.data_ptr();
  b.f.lse = lse.data_ptr<float>();
  b.dout = dout.data_ptr();
  b.drow = drow.data_ptr<float>();
  b.dq = dq.data_ptr<float>(); b.dk = dk.data_ptr<float>(); b.du = du.data_ptr<float>();
  C10_CUDA_CHECK(launch_read_bwd(b, read_elem(q), r.slots, B * T, at::cuda::getCurrentCUDAStream()));
  return {dq, dk, du};
}

namespace {

bool use_kernels(const Tensor& q, const Shapes& s) { return read_kernels_support(q, s.K, s.V) && s.B * s.T > 0; }

// LINFLOW_DELTAFORMER_WRITE=aten: the ATen write pass even where the kernel runs (A/B measurements). Read once.
bool write_kernel_enabled() {
  static const bool on = !env_is("LINFLOW_DELTAFORMER_WRITE", "aten");
  return on;
}

// LINFLOW_DELTAFORMER_WRITE_BWD=aten: the ATen write-pass backward even where the kernels (write_bwd_kernel.cu)
// run (A/B measurements). Read once.
bool write_bwd_kernel_enabled() {
  static const bool on = !env_is("LINFLOW_DELTAFORMER_WRITE_BWD", "aten");
  return on;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                            const std::optional<Tensor>& beta,
                                                            const std::optional<Tensor>& w,
                                                            const std::optional<Tensor>& cu_seqlens, double scale,
                                                            int64_t chunk_size) {
  const Shapes s = check_args("deltaformer_fwd", q, k, v, beta, w, cu_seqlens, chunk_size);
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  if (!use_kernels(q, s)) return fwd_aten(q, k, v, beta, w, cu_seqlens, scale, chunk_size);
  auto [u, r, lse_w] = write_kernel_enabled() && write_fwd_cuda_supports(k, v, beta, w)
                           ? write_fwd_cuda(k, v, beta, w, cu_seqlens, scale, chunk_size)
                           : write_fwd(k, v, beta, w, cu_seqlens, scale, chunk_size);
  auto [o, lse_o] = read_fwd_cuda(q, k, u, cu_seqlens, scale);
  return {o, u, r, lse_w, lse_o};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
    const std::optional<Tensor>& w, const std::optional<Tensor>& cu_seqlens, const Tensor& o, const Tensor& u,
    const Tensor& r, const Tensor& lse_w, const Tensor& lse_o, const Tensor& grad_o,
    const std::optional<Tensor>& grad_u, double scale, int64_t chunk_size) {
  std::optional<Tensor> gu;
  const Shapes s = check_bwd_args(q, k, v, beta, w, cu_seqlens, o, u, r, lse_w, lse_o, grad_o, grad_u, chunk_size, gu);
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  if (!use_kernels(q, s))
    return bwd_aten(q, k, v, beta, w, cu_seqlens, o, u, r, lse_w, lse_o, grad_o, grad_u, scale, chunk_size);
  auto [dq, dk_read, du] = read_bwd_cuda(q, k, u, o, lse_o, grad_o, cu_seqlens, scale);
  if (gu.has_value()) du.add_(*gu);
  auto [dv, dbeta, dw, dk] = write_bwd_kernel_enabled() && write_bwd_cuda_supports(k, v, beta, w)
                                 ? write_bwd_cuda(k, v, beta, w, cu_seqlens, u, r, lse_w, du, scale, chunk_size)
                                 : write_bwd(k, v, beta, w, cu_seqlens, u, r, lse_w, du, scale, chunk_size);
  dk.add_(dk_read);
  if (!present(w)) dk.add_(dw);  // w = k: the write query's gradient is k's too
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()),
          present(beta) ? dbeta.to(beta->scalar_type()) : at::empty({0}, q.options()),
          present(w) ? dw.to(w->scalar_type()) : at::empty({0}, q.options())};
}

}  // namespace
}  // namespace linflow::deltaformer

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("deltaformer_fwd", &linflow::deltaformer::fwd_cuda);
  m.impl("deltaformer_bwd", &linflow::deltaformer::bwd_cuda);
}
#endif  // LINFLOW_WITH_CUDA
