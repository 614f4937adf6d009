// Delta rule chunk kernels: launchers. Runtime head dim -> compile-time tile (KP: K padded to 64 / 128 / 256) and
// v-tile width (BV); each kernel gets the dynamic shared memory its carve() computes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "delta_rule/kernels.cuh"
#include "delta_rule/kernels_bwd.cuh"
#include "common/launch.cuh"
#include "delta_rule/launch.h"
#include "delta_rule/state_mma.cuh"
#include "delta_rule/state_wgmma.cuh"

namespace linflow::delta_rule {
namespace {

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, const Params& p, cudaStream_t stream,
                   int threads = tile::kThreads) {
  return launch_kernel(kernel, grid, threads, smem, p, stream);
}

// Warps per block of the register-state passes (a block owns 16 value columns a warp): the widest block that V fills.
// Measured on the H100 (B1 T65536 H16 K=V=128, bf16): 4-warp blocks (32 blocks) beat 1-warp blocks (128 blocks),
// fwd 7.90 -> 6.56 ms, fwd+bwd 28.9 -> 25.1 ms: a chunk step is bound by one warp's instruction issue, and a wider
// block splits the chunk's tile loads between its warps, so it finishes each step sooner even with fewer blocks.
// The backward pass caps at 4 warps as well: 8-warp blocks were slower at B1 T65536 (fwd+bwd 22.9 ms against
// 19.5 ms with 4) and equal at B8 T4096 (5.25 / 5.29 ms).
// `forced` (FwdParams::state_warps, from LINFLOW_STATE_WARPS) overrides the rule, for tuning experiments.
template <typename F>
cudaError_t with_state_warps(int64_t V, int max_warps, int forced, F&& f) {
  int nw = forced > 0 ? forced : max_warps;
  while (nw > 1 && forced <= 0 && 16 * (nw / 2) >= V) nw /= 2;  // no warp without columns
  if (nw >= 8 && max_warps >= 8) return f(std::integral_constant<int, 8>{});
  if (nw >= 4) return f(std::integral_constant<int, 4>{});
  if (nw == 2) return f(std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 1>{});
}

// The wgmma state passes (state_wgmma.cuh) run where the build has sm_90a code and the current device is a 9.0 one,
// unless FwdParams::state_mma_sync (LINFLOW_STATE_MMA=sync) asks for the mma.sync passes. Attribute queries of the
// current device (no sync), so a process with several kinds of GPU picks per device.
bool use_wgmma_state(const FwdParams& p) {
#ifdef LINFLOW_SM90A
  int dev = 0, major = 0, minor = 0;
  return !p.state_mma_sync && cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess && major == 9 &&
         minor == 0;
#else
  (void)p;
  return false;
#endif
}

// The current device's multiprocessor count.
cudaError_t multiprocessors(int& sms) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return err;
}

// Grid of the wgmma state passes: 64-column state slices x heads x sequences.
dim3 wg_state_grid(const FwdParams& p, int64_t N) {
  return dim3(static_cast<unsigned>((p.V + kWgColumns - 1) / kWgColumns), static_cast<unsigned>(p.H),
              static_cast<unsigned>(N));
}

// Whether one block a multiprocessor holds that whole grid (then the sequential passes leave multiprocessors idle).
bool wg_state_grid_fits(const FwdParams& p, int64_t N, int sms) {
  const dim3 g = wg_state_grid(p, N);
  return static_cast<int64_t>(g.x) * g.y * g.z <= sms;
}

template <typename F>
cudaError_t with_head_tiles(int64_t K, F&& f) {
  if (K <= 64) return f(std::integral_constant<int, 64>{}, std::integral_constant<int, 64>{});
  if (K <= 128) return f(std::integral_constant<int, 128>{}, std::integral_constant<int, 64>{});
  return f(std::integral_constant<int, 256>{}, std::integral_constant<int, 32>{});
}

// wy_fwd: w, u (and Tm where p.tm is set), parallel over every chunk of every sequence.
template <typename T>
cudaError_t launch_wy(const FwdParams& p, int64_t slots, cudaStream_t stream) {
  return with_head_tiles(p.K, [&](auto kp, auto) {
    constexpr int KP = decltype(kp)::value;
    return launch(wy_fwd_kernel<KP, T>, dim3(static_cast<unsigned>(slots), static_cast<unsigned>(p.H)),
                  WyFwdSmem<KP, T>::carve(nullptr, nullptr), p, stream);
  });
}

// state_fwd: the sequential pass, h and vn (and ht).
template <typename T>
cudaError_t launch_state_fwd(const FwdParams& p, int64_t N, cudaStream_t stream) {
  return with_head_tiles(p.K, [&](auto kp, auto bv) {
    constexpr int KP = decltype(kp)::value, BV = decltype(bv)::value;
    const unsigned H = static_cast<unsigned>(p.H);
    if constexpr (KP <= 128) {
      if (use_wgmma_state(p)) {
        // Three stages (one block a multiprocessor) where the grid leaves multiprocessors idle, else two (two).
        const dim3 grid = wg_state_grid(p, N);
        int sms = 0;
        const cudaError_t err = multiprocessors(sms);
        if (err != cudaSuccess) return err;
        if (wg_state_grid_fits(p, N, sms))
          return launch(state_fwd_wg_kernel<KP, 3, T>, grid, StateWgSmem<KP, 3, T>::carve(nullptr, nullptr, 2, 1) +
                        wgmma::kAlign, p, stream, 128);
        return launch(state_fwd_wg_kernel<KP, 2, T>, grid, StateWgSmem<KP, 2, T>::carve(nullptr, nullptr, 2, 1) +
                      wgmma::kAlign, p, stream, 128);
      }
      return with_state_warps(p.V, 4, p.state_warps, [&](auto nw) {
        constexpr int NW = decltype(nw)::value;
        const unsigned nvw = static_cast<unsigned>((p.V + 16 * NW - 1) / (16 * NW));
        return launch(state_fwd_mma_kernel<KP, NW, T>, dim3(nvw, H, static_cast<unsigned>(N)),
                      StateMmaSmem<KP, NW, T>::carve(nullptr, nullptr, 2, 1), p, stream, NW * 32);
      });
    } else {
      const unsigned nv = static_cast<unsigned>((p.V + BV - 1) / BV);
      return launch(state_fwd_kernel<KP, BV, T>, dim3(nv, H, static_cast<unsigned>(N)),
                    StateFwdSmem<KP, BV, T>::carve(nullptr, nullptr), p, stream);
    }
  });
}

// chunk_local_kernel: the output O (DVL false) or P^T dO (DVL true), parallel over chunks and 64-column v-tiles.
template <typename T, bool DVL>
cudaError_t launch_chunk_local(const BwdParams& b, int64_t slots, cudaStream_t stream) {
  return with_head_tiles(b.f.K, [&](auto kp, auto) {
    constexpr int KP = decltype(kp)::value;
    return launch(chunk_local_kernel<KP, T, DVL>, dim3(static_cast<unsigned>(slots), static_cast<unsigned>(b.f.H),
                                                       static_cast<unsigned>((b.f.V + kOutBV - 1) / kOutBV)),
                  OutputFwdSmem<KP, T>::carve(nullptr, nullptr, !DVL), b, stream, kOutWarps * 32);
  });
}

template <typename T>
cudaError_t forward(FwdParams& p, int64_t slots, int64_t N, bool want_output, cudaStream_t stream) {
  cudaError_t err = launch_wy<T>(p, slots, stream);
  if (err == cudaSuccess) err = launch_state_fwd<T>(p, N, stream);
  if (err == cudaSuccess && want_output)
    err = launch_chunk_local<T, false>(BwdParams{p}, slots, stream);
  return err;
}

// The backward, on two streams: the recompute of w, u (wy_fwd, main) and of h, vn (state_fwd, main) is independent
// of the dVn / dS pass (P^T dO by chunk_local, then state_bwd, side; state_bwd needs W, so it waits for wy_fwd), and the two
// sequential passes run side by side (B1 T65536 H16: 32 blocks each); chunk_bwd (main) needs both.
//   main: wy_fwd ----------> state_fwd ------> [wait side] chunk_bwd
//   side: chunk_local (P^T dO) -> [wait wy_fwd] state_bwd
template <typename T>
cudaError_t backward(BwdParams& b, int64_t slots, int64_t N, cudaStream_t main, cudaStream_t side) {
  return with_head_tiles(b.f.K, [&](auto kp, auto) -> cudaError_t {
    constexpr int KP = decltype(kp)::value;
    if constexpr (KP > 128) {
      return cudaErrorInvalidValue;  // the host side routes K > 128 to the ATen form
    } else {
      if (b.f.tm == nullptr) return cudaErrorInvalidValue;  // chunk_bwd reads the Tm wy_fwd stores
      const unsigned H = static_cast<unsigned>(b.f.H);
      // The side stream pays off where the sequential passes leave multiprocessors idle (few sequences x heads; at
      // B1 T65536 H16: fwd+bwd 13.9 -> 12.3 ms); where their grids fill the GPU it only adds contention.
      int sms = 0;
      cudaError_t err = multiprocessors(sms);
      if (err != cudaSuccess) return err;
      StreamFork fork(main, wg_state_grid_fits(b.f, N, sms) ? side : main);
      err = fork.status();
      if (err == cudaSuccess) err = launch_chunk_local<T, true>(b, slots, fork.side());
      if (err == cudaSuccess) err = launch_wy<T>(b.f, slots, fork.main());
      if (err == cudaSuccess) err = fork.handoff(fork.main(), fork.side());
      if (err == cudaSuccess) {
        if (use_wgmma_state(b.f)) {
          err = launch(state_bwd_wg_kernel<KP, 2, T>, wg_state_grid(b.f, N),
                       StateWgSmem<KP, 2, T>::carve(nullptr, nullptr, 3, 2) + wgmma::kAlign, b, fork.side(), 128);
        } else {
          err = with_state_warps(b.f.V, 4, b.f.state_warps, [&](auto nw) {
            constexpr int NW = decltype(nw)::value;
            const unsigned nvw = static_cast<unsigned>((b.f.V + 16 * NW - 1) / (16 * NW));
            return launch(state_bwd_mma_kernel<KP, NW, T>, dim3(nvw, H, static_cast<unsigned>(N)),
                          StateMmaSmem<KP, NW, T>::carve(nullptr, nullptr, 3, 2), b, fork.side(), NW * 32);
          });
        }
      }
      if (err == cudaSuccess) err = launch_state_fwd<T>(b.f, N, fork.main());
      const cudaError_t joined = fork.join();
      if (err == cudaSuccess) err = joined;
      if (err != cudaSuccess) return err;
      // chunk_bwd (KP 64 / 128): a persistent grid of one block (8 warps, ~226 KB of shared memory at KP 128) a
      // multiprocessor walking the slots x H items; it reads the Tm that wy_fwd stored (b.f.tm).
      b.slots = slots;
      const int64_t items = slots * b.f.H;
      return launch(chunk_bwd_kernel<KP, T>, dim3(static_cast<unsigned>(items < sms ? items : sms)),
                    ChunkBwdSmem<KP, T>::carve(nullptr, nullptr), b, main);
    }
  });
}

}  // namespace

cudaError_t launch_chunk_forward(FwdParams& p, Elem e, int64_t slots, int64_t N, bool want_output, cudaStream_t s) {
  if (e == Elem::bf16) return forward<__nv_bfloat16>(p, slots, N, want_output, s);
  if (e == Elem::f16) return forward<__half>(p, slots, N, want_output, s);
  return cudaErrorInvalidValue;
}

cudaError_t launch_chunk_backward(BwdParams& b, Elem e, int64_t slots, int64_t N, cudaStream_t s, cudaStream_t side) {
  if (e == Elem::bf16) return backward<__nv_bfloat16>(b, slots, N, s, side);
  if (e == Elem::f16) return backward<__half>(b, slots, N, s, side);
  return cudaErrorInvalidValue;
}

}  // namespace linflow::delta_rule
