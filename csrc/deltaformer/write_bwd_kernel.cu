// Deltaformer write pass backward on CUDA: host side of write_bwd_kernel.cuh (math, kernels and tiling there).
// Three launches on the current stream: (1) the reverse chunk sweep for dV, dbeta (one block per sequence and
// write head), then (2) dW (one block per row chunk) and dK (one block per key chunk).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>

#include "common/alloc.h"
#include "common/launch.cuh"
#include "deltaformer/write.h"
#include "deltaformer/write_bwd_kernel.cuh"
#include "deltaformer/write_host.h"

namespace linflow::deltaformer {
namespace {
using at::Tensor;
using wbwd::WriteBwdParams;

using write_host::aligned, write_host::present, write_host::with_dim;

template <typename Kern>
cudaError_t launch_one(Kern kernel, size_t smem, dim3 grid, cudaStream_t stream, const WriteBwdParams& p) {
  return launch_kernel(kernel, grid, wbwd::kThreads, smem, p, stream);
}

template <typename T>
cudaError_t launch_write_bwd(const WriteBwdParams& p, int64_t K, int64_t V, dim3 grid_seq, dim3 grid_chunks,
                             cudaStream_t stream) {
  return with_dim(K, [&](auto kk) {
    return with_dim(V, [&](auto vv) {
      constexpr int KK = decltype(kk)::value, VV = decltype(vv)::value;
      cudaError_t err = launch_one(wbwd::write_bwd_dv_kernel<KK, VV, T>, wbwd::DvSmem<KK, VV, T>::total, grid_seq,
                                   stream, p);
      if (err != cudaSuccess) return err;
      constexpr size_t ps = wbwd::PairSmem<KK, VV, T>::total;
      err = launch_one(wbwd::write_bwd_pair_kernel<KK, VV, T, false>, ps, grid_chunks, stream, p);
      if (err != cudaSuccess) return err;
      return launch_one(wbwd::write_bwd_pair_kernel<KK, VV, T, true>, ps, grid_chunks, stream, p);
    });
  });
}


}  // namespace

bool write_bwd_cuda_supports(const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                             const std::optional<Tensor>& w) {
  return write_fwd_cuda_supports(k, v, beta, w);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> write_bwd_cuda(const Tensor& k, const Tensor& v,
                                                          const std::optional<Tensor>& beta,
                                                          const std::optional<Tensor>& w,
                                                          const std::optional<Tensor>& cu_seqlens, const Tensor& u,
                                                          const Tensor& r, const Tensor& lse_w, const Tensor& du,
                                                          double scale, int64_t chunk_size) {
  const char* op = "deltaformer write_bwd_cuda";
  TORCH_CHECK(write_bwd_cuda_supports(k, v, beta, w), op,
              ": needs CUDA k, v (and w) of one dtype, bfloat16 or float16, head dims K, V in {32, 64, 128}; got k ",
              k.scalar_type(), " ", k.sizes(), ", v ", v.scalar_type(), " ", v.sizes());
  TORCH_CHECK(chunk_size == 16 || chunk_size == 32 || chunk_size == 64, op, ": chunk_size must be 16, 32 or 64, got ",
              chunk_size);
  const int64_t B = k.size(0), T = k.size(1), Hkv = k.size(2), K = k.size(3), V = v.size(3);
  TORCH_CHECK(u.sizes() == v.sizes() && r.sizes() == v.sizes() && du.sizes() == v.sizes(), op,
              ": u, r, du must be [B, T, Hkv, V]");
  TORCH_CHECK(lse_w.dim() == 3 && lse_w.size(0) == B && lse_w.size(1) == T && lse_w.size(2) == Hkv, op,
              ": lse_w must be [B, T, Hkv]");
  const c10::cuda::OptionalCUDAGuard guard(k.device());
  const auto fopts = k.options().dtype(at::kFloat);
  Tensor dv = at::zeros({B, T, Hkv, V}, fopts), dbeta = at::zeros({B, T, Hkv}, fopts);
  Tensor dw = at::zeros({B, T, Hkv, K}, fopts), dk = at::zeros({B, T, Hkv, K}, fopts);
  Tensor cu;
  int64_t N = B;
  if (present(cu_seqlens)) {
    TORCH_CHECK(B == 1, op, ": with cu_seqlens the batch size must be 1, got ", B);
    cu = cu_seqlens->to(k.device(), at::kLong).contiguous();
    N = cu.size(0) - 1;
  }
  if (B * T * Hkv == 0 || N <= 0) return {dv, dbeta, dw, dk};
  TORCH_CHECK(N <= INT32_MAX && Hkv <= 65535, op, ": too many sequences or heads");
  const auto dt = k.scalar_type();
  Tensor kc = aligned(k, dt), wc = present(w) ? aligned(*w, dt) : kc;
  Tensor u16 = aligned(u, dt);
  Tensor rc = r.to(at::kFloat).contiguous(), duc = du.to(at::kFloat).contiguous();
  Tensor lc = lse_w.to(at::kFloat).contiguous();
  Tensor bc = present(beta) ? beta->to(at::kFloat).contiguous() : Tensor();
  Tensor b16 = at::empty({B, T, Hkv, V}, k.options());
  Tensor delta = at::empty({B, T, Hkv}, fopts);
  WriteBwdParams p{};
  p.k = kc.data_ptr();
  p.w = wc.data_ptr();
  p.u16 = u16.data_ptr();
  p.b16 = b16.data_ptr();
  p.beta = bc.defined() ? bc.data_ptr<float>() : nullptr;
  p.lse = lc.data_ptr<float>();
  p.r = rc.data_ptr<float>();
  p.du = duc.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  p.dbeta = dbeta.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dw = dw.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.seq = chunk::SeqLayout{cu.defined() ? cu.data_ptr<int64_t>() : nullptr, T, static_cast<int>(N)};
  p.H = static_cast<int>(Hkv);
  p.sl2 = static_cast<float>(scale) * wbwd::kLog2e;
  p.scale = static_cast<float>(scale);
  const int64_t slots = chunk::num_slots(cu.defined(), T, N);
  TORCH_CHECK(slots <= INT32_MAX, op, ": too many chunks");
  const dim3 grid_seq(static_cast<unsigned>(N), static_cast<unsigned>(Hkv));
  const dim3 grid_chunks(static_cast<unsigned>(slots), static_cast<unsigned>(Hkv));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = dt == at::kBFloat16
                              ? launch_write_bwd<__nv_bfloat16>(p, K, V, grid_seq, grid_chunks, stream)
                              : launch_write_bwd<__half>(p, K, V, grid_seq, grid_chunks, stream);
  C10_CUDA_CHECK(err);
  return {dv, dbeta, dw, dk};
}

}  // namespace linflow::deltaformer
