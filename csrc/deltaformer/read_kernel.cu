// Deltaformer read pass on CUDA: host launchers of read_kernel.cuh (math, kernels and tiling there).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

template <typename T>
cudaError_t fwd(const ReadFwdParams& p, int64_t slots, cudaStream_t s) {
  return with_dims(p.K, p.V, [&](auto kp, auto vp) {
    constexpr int KP = decltype(kp)::value, VP = decltype(vp)::value;
    return launch_kernel(read_fwd_kernel<KP, VP, T>, dim3(static_cast<unsigned>(fwd_blocks(p.seq, slots) * p.H)),
                         kThreads, FwdSmem<KP, VP, T>::kBytes, p, s);
  });
}

template <typename T>
cudaError_t bwd(const ReadBwdParams& b, int64_t slots, int64_t tokens, cudaStream_t s) {
  const int64_t rows = tokens * b.f.H;
  if (rows == 0) return cudaSuccess;
  read_drow_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, s>>>(b, rows);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return with_dims(b.f.K, b.f.V, [&](auto kp, auto vp) {
    constexpr int KP = decltype(kp)::value, VP = decltype(vp)::value;
    return launch_kernel(read_bwd_kernel<KP, VP, T>, dim3(static_cast<unsigned>(bwd_blocks(b.f.seq, slots) * b.f.Hkv)),
                         kBwdThreads, BwdSmem<KP, VP, T>::kBytes, b, s);
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
