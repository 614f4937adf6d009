// Delta rule chunk kernels: launchers. Runtime head dim -> compile-time tile (KP: K padded to 64 / 128 / 256) and
// v-tile width (BV); each kernel gets the dynamic shared memory its carve() computes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "delta_rule/kernels.cuh"
#include "delta_rule/kernels_bwd.cuh"
#include "delta_rule/launch.h"

namespace linflow::delta_rule {
namespace {

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, const Params& p, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid, tile::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename F>
cudaError_t with_head_tiles(int64_t K, F&& f) {
  if (K <= 64) return f(std::integral_constant<int, 64>{}, std::integral_constant<int, 64>{});
  if (K <= 128) return f(std::integral_constant<int, 128>{}, std::integral_constant<int, 64>{});
  return f(std::integral_constant<int, 256>{}, std::integral_constant<int, 32>{});
}

template <typename T>
cudaError_t forward(FwdParams& p, int64_t slots, int64_t N, bool want_output, cudaStream_t stream) {
  return with_head_tiles(p.K, [&](auto kp, auto bv) {
    constexpr int KP = decltype(kp)::value, BV = decltype(bv)::value;
    const unsigned nv = static_cast<unsigned>((p.V + BV - 1) / BV), H = static_cast<unsigned>(p.H);
    const unsigned ns = static_cast<unsigned>(slots);
    cudaError_t err = launch(wy_fwd_kernel<KP, T>, dim3(ns, H), WyFwdSmem<KP, T>::carve(nullptr, nullptr), p, stream);
    if (err == cudaSuccess)
      err = launch(state_fwd_kernel<KP, BV, T>, dim3(nv, H, static_cast<unsigned>(N)),
                   StateFwdSmem<KP, BV, T>::carve(nullptr, nullptr), p, stream);
    if (err == cudaSuccess && want_output)
      err = launch(output_fwd_kernel<KP, BV, T>, dim3(ns, H, nv), OutputFwdSmem<KP, BV, T>::carve(nullptr, nullptr),
                   p, stream);
    return err;
  });
}

template <typename T>
cudaError_t backward(BwdParams& b, int64_t slots, int64_t N, cudaStream_t stream) {
  return with_head_tiles(b.f.K, [&](auto kp, auto bv) -> cudaError_t {
    constexpr int KP = decltype(kp)::value, BV = decltype(bv)::value;
    if constexpr (KP > 128) {
      return cudaErrorInvalidValue;  // the host side routes K > 128 to the ATen form
    } else {
      const unsigned nv = static_cast<unsigned>((b.f.V + BV - 1) / BV), H = static_cast<unsigned>(b.f.H);
      cudaError_t err = launch(state_bwd_kernel<KP, BV, T>, dim3(nv, H, static_cast<unsigned>(N)),
                               StateBwdSmem<KP, BV, T>::carve(nullptr, nullptr), b, stream);
      if (err == cudaSuccess)
        err = launch(chunk_bwd_kernel<KP, T>, dim3(static_cast<unsigned>(slots), H),
                     ChunkBwdSmem<KP, T>::carve(nullptr, nullptr), b, stream);
      return err;
    }
  });
}

}  // namespace

cudaError_t launch_chunk_forward(FwdParams& p, Elem e, int64_t slots, int64_t N, bool want_output, cudaStream_t s) {
  if (e == Elem::bf16) return forward<__nv_bfloat16>(p, slots, N, want_output, s);
  if (e == Elem::f16) return forward<__half>(p, slots, N, want_output, s);
  return cudaErrorInvalidValue;
}

cudaError_t launch_chunk_backward(BwdParams& b, Elem e, int64_t slots, int64_t N, cudaStream_t s) {
  cudaError_t err = launch_chunk_forward(b.f, e, slots, N, false, s);  // recompute w, u, h, vn
  if (err != cudaSuccess) return err;
  if (e == Elem::bf16) return backward<__nv_bfloat16>(b, slots, N, s);
  if (e == Elem::f16) return backward<__half>(b, slots, N, s);
  return cudaErrorInvalidValue;
}

}  // namespace linflow::delta_rule
