// Deltaformer read pass on CUDA: host launchers of read_kernel.cuh (math, kernels and tiling there).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "common/launch.cuh"
#include "deltaformer/read.h"
#include "deltaformer/read_kernel.cuh"

namespace linflow::deltaformer {
namespace {
using namespace rdk;

// ---------------------------------------------------------------------------------------------------------------
// Runtime head dims -> padded compile-time tiles (64 or 128 each).
template <typename F>
cudaError_t with_dims(int K, int V, F&& f) {
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (K > kReadMaxDim || V > kReadMaxDim || K % 8 != 0 || V % 8 != 0) return cudaErrorInvalidValue;
  if (K <= 64) return V <= 64 ? f(D64{}, D64{}) : f(D64{}, D128{});
  return V <= 64 ? f(D128{}, D64{}) : f(D128{}, D128{});
}

// LINFLOW_DELTAFORMER_READ (read once), for A/B measurements: "v1" runs the first kernels (read_fwd_kernel,
// read_bwd_kernel) instead of read_fwd2_kernel, read_bwd2_kernel; "fwd1" only the first forward.
int read_version_env() {  // 0: v2 (default), 1: v1, 2: fwd1
  static const int v = [] {
    const char* e = std::getenv("LINFLOW_DELTAFORMER_READ");
    const std::string s = e ? e : "";
    return s == "v1" ? 1 : s == "fwd1" ? 2 : 0;
  }();
  return v;
}
bool fwd_v1() { return read_version_env() != 0; }
bool bwd_v1() { return read_version_env() == 1; }

template <typename T>
cudaError_t fwd(const ReadFwdParams& p, int64_t slots, cudaStream_t s) {
  return with_dims(p.K, p.V, [&](auto kp, auto vp) {
    constexpr int KP = decltype(kp)::value, VP = decltype(vp)::value;
    if (fwd_v1())
      return launch_kernel(read_fwd_kernel<KP, VP, T>, dim3(static_cast<unsigned>(slots * p.H)), kThreads,
                           FwdSmem<KP, VP, T>::kBytes, p, s);
    return launch_kernel(read_fwd2_kernel<KP, VP, T>, dim3(static_cast<unsigned>(fwd2_blocks(p.seq, slots) * p.H)),
                         kThreads, Fwd2Smem<KP, VP, T>::kBytes, p, s);
  });
}

template <typename T>
cudaError_t bwd(const ReadBwdParams& b, int64_t slots, int64_t tokens, cudaStream_t s) {
  const int64_t rows = tokens * b.f.H;
  if (rows == 0) return cudaSuccess;
  read_drow_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, s>>>(b, rows);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const bool v1 = bwd_v1();
  return with_dims(b.f.K, b.f.V, [&](auto kp, auto vp) {
    constexpr int KP = decltype(kp)::value, VP = decltype(vp)::value;
    if (v1)
      return launch_kernel(read_bwd_kernel<KP, VP, T>, dim3(static_cast<unsigned>(slots * b.f.Hkv)), kThreads,
                           BwdSmem<KP, VP, T>::kBytes, b, s);
    return launch_kernel(read_bwd2_kernel<KP, VP, T>,
                         dim3(static_cast<unsigned>(bwd2_blocks(b.f.seq, slots) * b.f.Hkv)), kBwd2Threads,
                         Bwd2Smem<KP, VP, T>::kBytes, b, s);
  });
}

}  // namespace

cudaError_t launch_read_fwd(const ReadFwdParams& p, ReadElem e, int64_t slots, cudaStream_t s) {
  return e == ReadElem::bf16 ? fwd<__nv_bfloat16>(p, slots, s) : fwd<__half>(p, slots, s);
}

cudaError_t launch_read_bwd(const ReadBwdParams& b, ReadElem e, int64_t slots, int64_t tokens, cudaStream_t s) {
  return e == ReadElem::bf16 ? bwd<__nv_bfloat16>(b, slots, tokens, s) : bwd<__half>(b, slots, tokens, s);
}

}  // namespace linflow::deltaformer
