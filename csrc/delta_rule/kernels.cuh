// Delta rule chunk kernels (ALGORITHMS.md §1), bf16/fp16 operands on tensor cores, fp32 accumulation and state.
// Forward = three launches:
//   wy_fwd     (slot, head):          W = Tm diag(beta e^gamma) K,  U = Tm diag(beta) V          -> w, u   [B,T,H,*]
//   state_fwd  (v-tile, head, seq):   walks the chunks: h_c = S (stored), Vn = U - W S,
//                                     S = e^gamma_C S + K^T diag(e^(gamma_C - gamma)) Vn        -> h, vn, ht
//   output_fwd (slot, head, v-tile):  O = s (diag(e^gamma) Q h_c + ((Q K^T) o E) Vn)             -> o
// Only state_fwd is sequential (over chunks); the other two are parallel over every chunk of every sequence.
#pragma once
#include "common/chunk.cuh"
#include "common/tile.cuh"

namespace linflow::delta_rule {

struct FwdParams {
  const void *q, *k, *v;       // [B,T,H,K|V], element type T
  const float *beta, *g;       // [B,T,H] fp32 (g may be null)
  const float* h0;             // [N,H,K,V] fp32 or null
  void *o, *w, *u, *vn, *h;    // outputs / workspaces (h: [slots,H,K,V])
  float* ht;                   // [N,H,K,V] fp32 or null
  chunk::SeqLayout seq;
  int H, K, V;
  float scale;
  bool vec_k, vec_v;           // 16-byte loads allowed along K / V
};

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
  for (int i = threadIdx.x; i < C * KP; i += blockDim.x) {  // Ks <- diag(beta e^gamma) K
    const int r = i / KP, col = i % KP;
    s.Ks[r * ld_h(KP) + col] = tile::from_f<T>(tile::to_f(s.Ks[r * ld_h(KP) + col]) * s.beta[r] * __expf(s.gam[r]));
  }
  __syncthreads();
  tile::gemm<C, KP, C, true, true, false>(s.Tmh, ld_h(C), s.Ks, ld_h(KP), s.Wf, ld_f(KP));
  __syncthreads();
  tile::store_tile<C, KP>(static_cast<T*>(p.w) + (tok0 * H + h) * K, H * K, s.Wf, rows, p.K);
  for (int v0 = 0; v0 < p.V; v0 += 64) {
    const int cols = min(64, p.V - v0);
    tile::load_tile<C, 64>(s.Vs, static_cast<const T*>(p.v) + (tok0 * H + h) * V + v0, H * V, rows, cols, false, s.beta);
    __syncthreads();
    tile::gemm<C, 64, C, true, true, false>(s.Tmh, ld_h(C), s.Vs, ld_h(64), s.Uf, ld_f(64));
    __syncthreads();
    tile::store_tile<C, 64>(static_cast<T*>(p.u) + (tok0 * H + h) * V + v0, H * V, s.Uf, rows, cols);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------------
template <int KP, int BV, typename T>
struct StateFwdSmem {
  T *Sh, *Wn, *Kd, *Vnh;
  float *S, *Vnf, *gam, *kd_scale;
  __host__ __device__ static size_t carve(char* base, StateFwdSmem* s) {
    SmemCarver sc{base};
    StateFwdSmem t;
    t.Sh = sc.take<T>(KP * ld_h(BV));
    t.Wn = sc.take<T>(C * ld_h(KP));
    t.Kd = sc.take<T>(C * ld_h(KP));
    t.Vnh = sc.take<T>(C * ld_h(BV));
    t.S = sc.take<float>(KP * ld_f(BV));
    t.Vnf = sc.take<float>(C * ld_f(BV));
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
  tile::load_tile_f<KP, BV>(s.S, p.h0 ? p.h0 + (n * H + h) * K * V + v0 : p.h0, V, p.h0 ? p.K : 0, cols);
  for (int64_t c = 0; c < nc; ++c) {
    const int rows = static_cast<int>(len - c * C < C ? len - c * C : C);
    const int64_t tok0 = bos + c * C;
    __syncthreads();  // S final from the previous chunk
    tile::to_half_tile<KP, BV>(s.Sh, s.S);
    tile::store_tile<KP, BV>(static_cast<T*>(p.h) + ((slot0 + c) * H + h) * K * V + v0, V, s.S, p.K, cols);
    tile::load_tile<C, KP>(s.Wn, static_cast<const T*>(p.w) + (tok0 * H + h) * K, H * K, rows, p.K, false, nullptr, true);
    tile::load_tile_f<C, BV>(s.Vnf, static_cast<const T*>(p.u) + (tok0 * H + h) * V + v0, H * V, rows, cols);
    chunk::load_gamma(s.gam, p.g ? p.g + tok0 * H + h : nullptr, H, rows);
    __syncthreads();
    if (threadIdx.x < C) s.kd_scale[threadIdx.x] = __expf(s.gam[C - 1] - s.gam[threadIdx.x]);
    tile::gemm<C, BV, KP, true, true, true>(s.Wn, ld_h(KP), s.Sh, ld_h(BV), s.Vnf, ld_f(BV));  // Vn = U - W S
    __syncthreads();
    tile::load_tile<C, KP>(s.Kd, static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows, p.K, false, s.kd_scale);
    tile::store_tile<C, BV>(static_cast<T*>(p.vn) + (tok0 * H + h) * V + v0, H * V, s.Vnf, rows, cols);
    tile::to_half_tile<C, BV>(s.Vnh, s.Vnf);
    const float decay = __expf(s.gam[C - 1]);
    for (int i = threadIdx.x; i < KP * BV; i += blockDim.x) s.S[(i / BV) * ld_f(BV) + i % BV] *= decay;
    __syncthreads();
    tile::gemm<KP, BV, C, false, true, true>(s.Kd, ld_h(KP), s.Vnh, ld_h(BV), s.S, ld_f(BV));  // S += Kd^T Vn
  }
  __syncthreads();
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
  tile::load_tile<KP, BV>(s.Hs, static_cast<const T*>(p.h) + (slot * H + h) * K * V + v0, V, p.K, cols, p.vec_v);
  tile::load_tile<C, BV>(s.Vnh, static_cast<const T*>(p.vn) + (tok0 * H + h) * V + v0, H * V, rows, cols, p.vec_v);
  chunk::load_gamma(s.gam, p.g ? p.g + tok0 * H + h : nullptr, H, rows);
  __syncthreads();
  tile::gemm<C, C, KP, true, false, false>(s.Qs, ld_h(KP), s.Ks, ld_h(KP), s.P, ld_f(C));  // Q K^T
  __syncthreads();
  for (int i = threadIdx.x; i < C * C; i += blockDim.x) {
    const int r = i / C, u = i % C;
    s.Ph[r * ld_h(C) + u] = tile::from_f<T>(u <= r ? p.scale * s.P[r * ld_f(C) + u] * __expf(s.gam[r] - s.gam[u]) : 0.f);
  }
  for (int i = threadIdx.x; i < C * KP; i += blockDim.x) {  // Qs <- s diag(e^gamma) Q
    const int r = i / KP, col = i % KP;
    s.Qs[r * ld_h(KP) + col] = tile::from_f<T>(tile::to_f(s.Qs[r * ld_h(KP) + col]) * p.scale * __expf(s.gam[r]));
  }
  __syncthreads();
  tile::gemm<C, BV, KP, true, true, false>(s.Qs, ld_h(KP), s.Hs, ld_h(BV), s.Of, ld_f(BV));
  __syncthreads();
  tile::gemm<C, BV, C, true, true, true>(s.Ph, ld_h(C), s.Vnh, ld_h(BV), s.Of, ld_f(BV));
  __syncthreads();
  tile::store_tile<C, BV>(static_cast<T*>(p.o) + (tok0 * H + h) * V + v0, H * V, s.Of, rows, cols);
}

}  // namespace linflow::delta_rule
