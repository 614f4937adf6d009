// Delta rule chunk kernels (ALGORITHMS.md §1), bf16/fp16 operands on tensor cores, fp32 accumulation and state.
// Forward = three launches:
//   wy_fwd     (slot, head):          W = Tm diag(beta e^gamma) K,  U = Tm diag(beta) V          -> w, u   [B,T,H,*]
//   state_fwd  (v-tile, head, seq):   walks the chunks: h_c = S (stored), Vn = U - W S,
//                                     S = e^gamma_C S + K^T diag(e^(gamma_C - gamma)) Vn        -> h, vn, ht
//   output_fwd (slot, head, v-tile):  O = s (diag(e^gamma) Q h_c + ((Q K^T) o E) Vn)             -> o
// Only state_fwd is sequential (over chunks); the other two are parallel over every chunk of every sequence.
#pragma once
#include "common/chunk.cuh"
#include "delta_rule/launch.h"
#include "common/tile.cuh"

namespace linflow::delta_rule {


// Bump allocator over dynamic shared memory; the host computes the same total with a null base.
struct SmemCarver {
  char* p;
  size_t used = 0;
  template <typename X>
  __host__ __device__ X* take(size_t count) {
    X* r = reinterpret_cast<X*>(p + used);
    used += (count * sizeof(X) + 127) / 128 * 128;
    return r;
  }
};

using chunk::C;

// Double-buffer pick without a run-time array index (which would put the pointer array in local memory).
template <typename X>
__device__ __forceinline__ X* pick(X* const (&buf)[2], int b) { return b ? buf[1] : buf[0]; }
using tile::ld_f;
using tile::ld_h;

// ---------------------------------------------------------------------------------------------------------------
template <int KP, typename T>
struct WyFwdSmem {
  T *Ks, *Tmh, *Vs;
  float *KKE, *Tm, *Wf, *Uf, *beta, *gam;
  __host__ __device__ static size_t carve(char* base, WyFwdSmem* s) {
    SmemCarver sc{base};
    WyFwdSmem t;
    t.Ks = sc.take<T>(C * ld_h(KP));
    t.Tmh = sc.take<T>(C * ld_h(C));
    t.Vs = sc.take<T>(C * ld_h(64));
    t.KKE = sc.take<float>(C * ld_f(C));
    t.Tm = sc.take<float>(C * ld_f(C));
    t.Wf = sc.take<float>(C * ld_f(KP));
    t.Uf = sc.take<float>(C * ld_f(64));
    t.beta = sc.take<float>(C);
    t.gam = sc.take<float>(C);
    if (s) *s = t;
    return sc.used;
  }
};

template <int KP, typename T>
__global__ void __launch_bounds__(256) wy_fwd_kernel(FwdParams p) {
  extern __shared__ __align__(128) char smem[];
  WyFwdSmem<KP, T> s;
  WyFwdSmem<KP, T>::carve(smem, &s);
  const int h = blockIdx.y;
  int n;
  int64_t c, bos, len;
  if (!p.seq.locate(blockIdx.x, n, c, bos, len)) return;
  const int rows = static_cast<int>(len - c * C < C ? len - c * C : C);
  const int64_t tok0 = bos + c * C, H = p.H, K = p.K, V = p.V;
  tile::load_tile<C, KP>(s.Ks, static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
  chunk::load_rows(s.beta, p.beta + tok0 * H + h, H, rows);
  chunk::load_gamma(s.gam, p.g ? p.g + tok0 * H + h : nullptr, H, rows);
  __syncthreads();
  chunk::wy_inverse<KP>(s.Ks, s.beta, s.gam, s.KKE, s.Tm);
  tile::to_half_tile<C, C>(s.Tmh, s.Tm);
  chunk::scale_rows<KP>(s.Ks, [&](int r) { return s.beta[r] * __expf(s.gam[r]); });  // Ks <- diag(beta e^gamma) K
  __syncthreads();
  tile::gemm<C, KP, C, true, true, false>(s.Tmh, ld_h(C), s.Ks, ld_h(KP), s.Wf, ld_f(KP));
  __syncthreads();
  tile::store_tile<C, KP>(static_cast<T*>(p.w) + (tok0 * H + h) * K, H * K, s.Wf, rows, p.K, p.vec_k);
  for (int v0 = 0; v0 < p.V; v0 += 64) {
    const int cols = min(64, p.V - v0);
    tile::load_tile<C, 64>(s.Vs, static_cast<const T*>(p.v) + (tok0 * H + h) * V + v0, H * V, rows, cols, p.vec_v && cols % 8 == 0, s.beta);
    __syncthreads();
    tile::gemm<C, 64, C, true, true, false>(s.Tmh, ld_h(C), s.Vs, ld_h(64), s.Uf, ld_f(64));
    __syncthreads();
    tile::store_tile<C, 64>(static_cast<T*>(p.u) + (tok0 * H + h) * V + v0, H * V, s.Uf, rows, cols, p.vec_v && cols % 8 == 0);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The chunk loop is latency-bound: the next chunk's W, K, U tiles and gates stream in (cp.async, two stages)
// while the current chunk computes. S stays in shared memory in fp32; its bf16/fp16 copy feeds the tensor cores.
template <int KP, int BV, typename T>
struct StateFwdSmem {
  T *W[2], *Kr[2], *U[2], *Sh, *Vnh;
  float *S, *WS, *g[2], *gam, *kd_scale;
  __host__ __device__ static size_t carve(char* base, StateFwdSmem* s) {
    SmemCarver sc{base};
    StateFwdSmem t;
    for (int b = 0; b < 2; ++b) {
      t.W[b] = sc.take<T>(C * ld_h(KP));
      t.Kr[b] = sc.take<T>(C * ld_h(KP));
      t.U[b] = sc.take<T>(C * ld_h(BV));
      t.g[b] = sc.take<float>(C);
    }
    t.Sh = sc.take<T>(KP * ld_h(BV));
    t.Vnh = sc.take<T>(C * ld_h(BV));
    t.S = sc.take<float>(KP * ld_f(BV));
    t.WS = sc.take<float>(C * ld_f(BV));
    t.gam = sc.take<float>(C);
    t.kd_scale = sc.take<float>(C);
    if (s) *s = t;
    return sc.used;
  }
};

template <int KP, int BV, typename T>
__global__ void __launch_bounds__(256) state_fwd_kernel(FwdParams p) {
  extern __shared__ __align__(128) char smem[];
  StateFwdSmem<KP, BV, T> s;
  StateFwdSmem<KP, BV, T>::carve(smem, &s);
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  const int cols = min(BV, p.V - v0);
  const int64_t H = p.H, K = p.K, V = p.V;
  int64_t bos, len;
  p.seq.seq(n, bos, len);
  const int64_t slot0 = p.seq.first_slot(n, bos), nc = (len + C - 1) / C;
  const bool vec_v = p.vec_v && cols % 8 == 0;
  auto prefetch = [&](int64_t c) {
    const int b = c & 1, rows = static_cast<int>(len - c * C < C ? len - c * C : C);
    const int64_t tok0 = bos + c * C;
    tile::fetch_tile<C, KP>(pick(s.W, b), static_cast<const T*>(p.w) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
    tile::fetch_tile<C, KP>(pick(s.Kr, b), static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
    tile::fetch_tile<C, BV>(pick(s.U, b), static_cast<const T*>(p.u) + (tok0 * H + h) * V + v0, H * V, rows, cols, vec_v);
    if (p.g) tile::fetch_column<C>(pick(s.g, b), p.g + tok0 * H + h, H, rows);
    tile::cp_async_commit();
  };
  tile::load_tile_f<KP, BV>(s.S, p.h0 ? p.h0 + (n * H + h) * K * V + v0 : p.h0, V, p.h0 ? p.K : 0, cols);
  if (nc > 0) prefetch(0);
  for (int64_t c = 0; c < nc; ++c) {
    const int b = c & 1, rows = static_cast<int>(len - c * C < C ? len - c * C : C);
    const int64_t tok0 = bos + c * C;
    if (c + 1 < nc) {
      prefetch(c + 1);
      tile::cp_async_wait<1>();
    } else {
      tile::cp_async_wait<0>();
    }
    __syncthreads();  // chunk c's tiles landed; S final from chunk c-1
    tile::to_half_tile<KP, BV>(s.Sh, s.S);
    tile::store_tile<KP, BV>(static_cast<T*>(p.h) + ((slot0 + c) * H + h) * K * V + v0, V, s.S, p.K, cols, vec_v);
    chunk::cumsum_rows(s.gam, p.g ? pick(s.g, b) : nullptr, 1, rows);
    __syncthreads();
    if (threadIdx.x < C) s.kd_scale[threadIdx.x] = __expf(s.gam[C - 1] - s.gam[threadIdx.x]);
    tile::gemm<C, BV, KP, true, true, false>(pick(s.W, b), ld_h(KP), s.Sh, ld_h(BV), s.WS, ld_f(BV));  // W S
    __syncthreads();
    for (int i = threadIdx.x; i < C * BV; i += blockDim.x) {  // Vn = U - W S; feed diag(e^(gamma_C - gamma)) Vn
      const int r = i / BV, col = i % BV;
      const float vn = tile::to_f(pick(s.U, b)[r * ld_h(BV) + col]) - s.WS[r * ld_f(BV) + col];
      s.WS[r * ld_f(BV) + col] = vn;
      s.Vnh[r * ld_h(BV) + col] = tile::from_f<T>(vn * s.kd_scale[r]);
    }
    __syncthreads();
    tile::store_tile<C, BV>(static_cast<T*>(p.vn) + (tok0 * H + h) * V + v0, H * V, s.WS, rows, cols, vec_v);
    tile::gemm<KP, BV, C, false, true, true>(pick(s.Kr, b), ld_h(KP), s.Vnh, ld_h(BV), s.S, ld_f(BV),
                                             __expf(s.gam[C - 1]));  // S = e^gamma_C S + K^T Vn'
    __syncthreads();  // buffer b is refilled by the prefetch of chunk c+2
  }
  if (p.ht) tile::store_tile<KP, BV>(p.ht + (n * H + h) * K * V + v0, V, s.S, p.K, cols);
}

// ---------------------------------------------------------------------------------------------------------------
template <int KP, int BV, typename T>
struct OutputFwdSmem {
  T *Qs, *Ks, *Ph, *Hs, *Vnh;
  float *P, *Of, *gam;
  __host__ __device__ static size_t carve(char* base, OutputFwdSmem* s) {
    SmemCarver sc{base};
    OutputFwdSmem t;
    t.Qs = sc.take<T>(C * ld_h(KP));
    t.Ks = sc.take<T>(C * ld_h(KP));
    t.Ph = sc.take<T>(C * ld_h(C));
    t.Hs = sc.take<T>(KP * ld_h(BV));
    t.Vnh = sc.take<T>(C * ld_h(BV));
    t.P = sc.take<float>(C * ld_f(C));
    t.Of = sc.take<float>(C * ld_f(BV));
    t.gam = sc.take<float>(C);
    if (s) *s = t;
    return sc.used;
  }
};

template <int KP, int BV, typename T>
__global__ void __launch_bounds__(256) output_fwd_kernel(FwdParams p) {
  extern __shared__ __align__(128) char smem[];
  OutputFwdSmem<KP, BV, T> s;
  OutputFwdSmem<KP, BV, T>::carve(smem, &s);
  const int h = blockIdx.y, v0 = blockIdx.z * BV;
  const int cols = min(BV, p.V - v0);
  int n;
  int64_t c, bos, len;
  if (!p.seq.locate(blockIdx.x, n, c, bos, len)) return;
  const int rows = static_cast<int>(len - c * C < C ? len - c * C : C);
  const int64_t tok0 = bos + c * C, H = p.H, K = p.K, V = p.V, slot = blockIdx.x;
  tile::load_tile<C, KP>(s.Qs, static_cast<const T*>(p.q) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
  tile::load_tile<C, KP>(s.Ks, static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
  tile::load_tile<KP, BV>(s.Hs, static_cast<const T*>(p.h) + (slot * H + h) * K * V + v0, V, p.K, cols, p.vec_v && cols % 8 == 0);
  tile::load_tile<C, BV>(s.Vnh, static_cast<const T*>(p.vn) + (tok0 * H + h) * V + v0, H * V, rows, cols, p.vec_v && cols % 8 == 0);
  chunk::load_gamma(s.gam, p.g ? p.g + tok0 * H + h : nullptr, H, rows);
  __syncthreads();
  tile::gemm<C, C, KP, true, false, false>(s.Qs, ld_h(KP), s.Ks, ld_h(KP), s.P, ld_f(C));  // Q K^T
  __syncthreads();
  chunk::causal_decayed_scores(s.Ph, s.P, s.gam, p.scale);
  chunk::scale_rows<KP>(s.Qs, [&](int r) { return p.scale * __expf(s.gam[r]); });  // Qs <- s diag(e^gamma) Q
  __syncthreads();
  tile::gemm<C, BV, KP, true, true, false>(s.Qs, ld_h(KP), s.Hs, ld_h(BV), s.Of, ld_f(BV));
  __syncthreads();
  tile::gemm<C, BV, C, true, true, true>(s.Ph, ld_h(C), s.Vnh, ld_h(BV), s.Of, ld_f(BV));
  __syncthreads();
  tile::store_tile<C, BV>(static_cast<T*>(p.o) + (tok0 * H + h) * V + v0, H * V, s.Of, rows, cols, p.vec_v && cols % 8 == 0);
}

}  // namespace linflow::delta_rule
