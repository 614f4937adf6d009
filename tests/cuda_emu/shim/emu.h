// CPU emulation of the CUDA features the kernels under tests/cuda_emu use: one OS thread per CUDA thread, std::barrier for
// __syncthreads and for warp collectives (shuffles, ldmatrix, mma.sync exchange their operands through per-warp
// slots), deferred cp.async (data lands in shared memory at cp.async.wait_group).
#pragma once
#include <algorithm>
#include <barrier>
#include <chrono>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __shared__
#define __align__(n)
#define __launch_bounds__(...)
#define __restrict__

struct dim3e { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3e threadIdx, blockIdx, blockDim;
#ifndef EMU_HAS_GRIDDIM  // gridDim (the LION sweeps read gridDim.x)
#define EMU_HAS_GRIDDIM
inline thread_local dim3e gridDim;
#endif

struct uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
struct float2 { float x, y; };
#ifndef EMU_HAS_FLOAT4  // float4 (the LION sweeps' partial numerators)
#define EMU_HAS_FLOAT4
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
#endif
inline uint4 __ldg(const uint4* p) { assert(reinterpret_cast<uintptr_t>(p) % 16 == 0); return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float __expf(float x) { return std::exp(x); }

struct __nv_bfloat16 { uint16_t x; };
struct __half { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {uint16_t(0x7fc0)};
  u += 0x7fff + ((u >> 16) & 1);
  return {uint16_t(u >> 16)};
}
inline float __half2float(__half h) { _Float16 x; std::memcpy(&x, &h.x, 2); return float(x); }
inline __half __float2half(float f) { _Float16 x = (_Float16)f; __half h; std::memcpy(&h.x, &x, 2); return h; }

struct WarpCtx {
  std::barrier<> bar{32};
  uint64_t slot[32];
  const void* addr[32];
  uint32_t a[32][4], b[32][2];
};
inline WarpCtx* g_warps = nullptr;
inline std::barrier<>* g_block_bar = nullptr;
// EMU_SKEW=1 / 2: before each warp collective, warp w waits (w or 7 - w) x EMU_SKEW_US (default 5000) us, so the
// warps drift apart and a
// missing __syncthreads shows up as a read of poisoned or stale shared memory.
inline int g_skew = [] { const char* e = std::getenv("EMU_SKEW"); return e ? std::atoi(e) : 0; }();
inline int g_skew_us = [] { const char* e = std::getenv("EMU_SKEW_US"); return e ? std::atoi(e) : 5000; }();
inline WarpCtx& cur_warp() {
  if (g_skew) {
    const int w = threadIdx.x / 32, d = g_skew == 1 ? w : 7 - w;
    if (d) std::this_thread::sleep_for(std::chrono::microseconds(g_skew_us * d));
  }
  return g_warps[threadIdx.x / 32];
}
inline int cur_lane() { return threadIdx.x % 32; }

void cp_async_flush_all();
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cur_warp().bar.arrive_and_wait(); }

template <typename X, typename F>
inline X shfl_any(X v, F&& src_of) {
  static_assert(sizeof(X) <= 8);
  WarpCtx& w = cur_warp();
  const int l = cur_lane();
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(X));
  w.slot[l] = u;
  w.bar.arrive_and_wait();
  X r;
  const uint64_t got = w.slot[src_of(l)];
  std::memcpy(&r, &got, sizeof(X));
  w.bar.arrive_and_wait();
  return r;
}
template <typename X> inline X __shfl_xor_sync(unsigned, X v, int o) { return shfl_any(v, [&](int l) { return l ^ o; }); }
template <typename X> inline X __shfl_sync(unsigned, X v, int s) { return shfl_any(v, [&](int) { return s; }); }
template <typename X> inline X __shfl_up_sync(unsigned, X v, int o) { return shfl_any(v, [&](int l) { return l >= o ? l - o : l; }); }
template <typename X> inline X __shfl_down_sync(unsigned, X v, int o) { return shfl_any(v, [&](int l) { return l + o < 32 ? l + o : l; }); }

// deferred cp.async: per thread, pending copies grouped by commit
struct PendingCopy { void* dst; std::vector<unsigned char> data; };
inline thread_local std::vector<std::vector<PendingCopy>> t_groups;  // committed groups, oldest first
inline thread_local std::vector<PendingCopy> t_open;                  // not yet committed
inline void cp_async_issue(void* dst, const void* src, int n, bool valid) {
  PendingCopy pc{dst, std::vector<unsigned char>(n, 0)};
  if (valid) std::memcpy(pc.data.data(), src, n);
  t_open.push_back(std::move(pc));
}
inline void cp_async_commit_emu() { t_groups.push_back(std::move(t_open)); t_open.clear(); }
inline void cp_async_wait_emu(int n) {
  while (static_cast<int>(t_groups.size()) > n) {
    for (auto& pc : t_groups.front()) std::memcpy(pc.dst, pc.data.data(), pc.data.size());
    t_groups.erase(t_groups.begin());
  }
}
inline void cp_async_flush_all() { cp_async_commit_emu(); cp_async_wait_emu(0); }
