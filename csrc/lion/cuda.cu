// LION chunk kernels: launchers. Runtime head dims -> compile-time tiles (KP: K padded to 64 / 128; NW: 4 warps for
// V <= 64, else 8), each kernel with the dynamic shared memory SweepSmem computes. The forward sweep and the backward
// sweep are two launches on one stream (the second reads the first's partials).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "lion/kernels.cuh"
#include "lion/launch.h"

namespace linflow::lion {
namespace {

template <int KP, int NW, bool BWD, typename T, bool GR>
cudaError_t launch_sweep(const FwdParams& p, int64_t N, cudaStream_t stream) {
  constexpr int BV = 16 * NW;
  const size_t smem = SweepSmem<KP, NW, T>::bytes(BWD, p.rowx != nullptr);
  auto kernel = sweep_kernel<KP, NW, BWD, T, GR>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.V + BV - 1) / BV), static_cast<unsigned>(p.H), static_cast<unsigned>(N));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  kernel<<<grid, NW * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool GR>
cudaError_t forward(const FwdParams& p, int64_t N, cudaStream_t stream) {
  auto run = [&](auto kp, auto nw) -> cudaError_t {
    constexpr int KP = decltype(kp)::value, NW = decltype(nw)::value;
    static_assert(16 * NW == 64 || 16 * NW == 128, "sweep_block_columns");
    cudaError_t err = launch_sweep<KP, NW, false, T, GR>(p, N, stream);
    if (err != cudaSuccess) return err;
    return launch_sweep<KP, NW, true, T, GR>(p, N, stream);
  };
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  using W4 = std::integral_constant<int, 4>;
  using W8 = std::integral_constant<int, 8>;
  const bool wide = p.block_columns == 128;
  if (p.K <= 64) return wide ? run(I64{}, W8{}) : run(I64{}, W4{});
  if (p.K <= 128) return wide ? run(I128{}, W8{}) : run(I128{}, W4{});
  return cudaErrorInvalidValue;  // the host side routes K > 128 to the ATen form
}

}  // namespace

cudaError_t launch_forward(const FwdParams& p, Elem e, int64_t N, cudaStream_t s) {
  if (e == Elem::bf16) return forward<__nv_bfloat16, false>(p, N, s);
  if (e == Elem::f16) return forward<__half, false>(p, N, s);
  return cudaErrorInvalidValue;
}

cudaError_t launch_grad_sweeps(const FwdParams& p, Elem e, int64_t N, cudaStream_t s) {
  if (p.normalize) return cudaErrorInvalidValue;  // gradient mode sums PF + PB unnormalised
  if (e == Elem::bf16) return forward<__nv_bfloat16, true>(p, N, s);
  if (e == Elem::f16) return forward<__half, true>(p, N, s);
  return cudaErrorInvalidValue;
}

}  // namespace linflow::lion
