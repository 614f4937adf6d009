// Delta rule chunk kernels (ALGORITHMS.md §1), bf16/fp16 operands on tensor cores, fp32 accumulation and state.
// Forward = three launches:
//   wy_fwd      (slot, head):          W = Tm diag(beta e^gamma) K,  U = Tm diag(beta) V          -> w, u   [B,T,H,*]
//   state_fwd   (v-tile, head, seq):   walks the chunks: h_c = S (stored), Vn = U - W S,
//                                      S = e^gamma_C S + K^T diag(e^(gamma_C - gamma)) Vn        -> h, vn, ht
//   chunk_local (slot, head, v-tile):  O = s (diag(e^gamma) Q h_c + ((Q K^T) o E) Vn)             -> o
//                                      (the backward's P^T dO is the same kernel with Q and K swapped)
// (state_fwd for K <= 128 runs on wgmma (state_wgmma.cuh) or mma.sync (state_mma.cuh) with register state.)
// Only state_fwd is sequential (over chunks); the other two are parallel over every chunk of every sequence.
#pragma once
#include "common/chunk.cuh"
#include "delta_rule/launch.h"
#include "common/mma.cuh"
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
// wy_fwd on mma.sync, block = (slot, head), 8 warps. KKE = (K K^T) o E (register products, masked, to shared
// memory), the register forward substitution writes Tm twice with its columns scaled (Tw = Tm diag(beta e^gamma),
// Tu = Tm diag(beta)), then W = Tw K and U = Tu V: warp w computes rows 16 (w % 4).. and half of the columns
// (w / 4), storing straight from its accumulators.
constexpr int kWyBV = 128;  // v-tile of U

template <int KP, typename T>
struct WyFwdSmem {
  T *Ks, *Vs, *Tw, *Tu;
  float *KKE, *beta, *gam;
  __host__ __device__ static size_t carve(char* base, WyFwdSmem* s) {
    SmemCarver sc{base};
    WyFwdSmem t;
    t.Ks = sc.take<T>(C * ld_h(KP));
    t.Vs = sc.take<T>(C * ld_h(kWyBV));
    t.Tw = sc.take<T>(C * ld_h(C));
    t.Tu = sc.take<T>(C * ld_h(C));
    t.KKE = sc.take<float>(C * ld_f(C));
    t.beta = sc.take<float>(C);
    t.gam = sc.take<float>(C);
    if (s) *s = t;
    return sc.used;
  }
};

// dst (rows r0, r0 + 8 of a C-row chunk, columns n0 + 8 j + 2t, +1) = acc, as element pairs where possible.
template <int NJ, typename T>
__device__ __forceinline__ void store_acc_rows(T* dst, int64_t row_stride, const float (&acc)[NJ][4], int r0, int n0,
                                               int rows, int cols, bool pairs) {
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = r0 + 8 * half, col = n0 + 8 * j + 2 * t4;
      if (r >= rows || col >= cols) continue;
      T* d = dst + r * row_stride + col;
      if (pairs && col + 1 < cols) {
        *reinterpret_cast<uint32_t*>(d) = mma::pack2<T>(acc[j][2 * half], acc[j][2 * half + 1]);
      } else {
        d[0] = tile::from_f<T>(acc[j][2 * half]);
        if (col + 1 < cols) d[1] = tile::from_f<T>(acc[j][2 * half + 1]);
      }
    }
}

// The same 16 x 8 NJ block (rows m0 .. m0 + 15, columns n0 ..) through the warp's staging rows `st` (16 rows of
// 8 NJ 16-bit elements, the 16-byte piece q of row r at q ^ (r % NJ): conflict-free writes) and out in 16-byte
// stores that fill whole sectors (the pair stores of store_acc_rows fill half of each). Needs `cols` % 8 == 0 and
// 16-byte aligned rows; NJ 4 or 8. Warp-private: __syncwarp only.
template <int NJ, typename T>
__device__ __forceinline__ void store_acc_rows_staged(T* dst, int64_t row_stride, const float (&acc)[NJ][4], T* st,
                                                      int m0, int n0, int rows, int cols) {
  static_assert(NJ == 4 || NJ == 8, "rows of 64 or 128 bytes");
  const int lane = threadIdx.x % 32, g8 = lane / 4, t4 = lane % 4;
  __syncwarp();  // the previous block's reads of st are done
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = g8 + 8 * half;
      *reinterpret_cast<uint32_t*>(st + r * 8 * NJ + 8 * (j ^ (r % NJ)) + 2 * t4) =
          mma::pack2<T>(acc[j][2 * half], acc[j][2 * half + 1]);
    }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < NJ / 2; ++i) {
    const int idx = lane + 32 * i, r = idx / NJ, q = idx % NJ;
    if (m0 + r < rows && n0 + 8 * q < cols)
      *reinterpret_cast<uint4*>(dst + (m0 + r) * row_stride + n0 + 8 * q) =
          *reinterpret_cast<const uint4*>(st + r * 8 * NJ + 8 * (q ^ (r % NJ)));
  }
}

// acc (16 x 8 NJ) = A (rows m0.. of a C x C half tile) . X[:, n0 .. n0 + 8 NJ) (X: C rows, ldx).
template <int NJ, typename T>
__device__ __forceinline__ void gemm_rows_cc(float (&acc)[NJ][4], const T* A, int m0, const T* X, int ldx, int n0) {
  uint32_t a[C / 16][4];
#pragma unroll
  for (int kb = 0; kb < C / 16; ++kb) mma::a_from_rows(a[kb], A, ld_h(C), m0, 16 * kb);
  mma::zero_acc(acc);
  mma::mma_acc<false>(acc, a, X, ldx, n0);
}

template <int KP, typename T>
__global__ void __launch_bounds__(256, KP <= 128 ? 3 : 1) wy_fwd_kernel(FwdParams p) {  // 3 blocks an SM: ~71 KB each
  extern __shared__ __align__(128) char smem[];
  WyFwdSmem<KP, T> s;
  WyFwdSmem<KP, T>::carve(smem, &s);
  const int h = blockIdx.y;
  int n;
  int64_t c, bos, len;
  if (!p.seq.locate(blockIdx.x, n, c, bos, len)) return;
  const int rows = static_cast<int>(len - c * C < C ? len - c * C : C);
  const int64_t tok0 = bos + c * C, H = p.H, K = p.K, V = p.V;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g8 = lane / 4, t4 = lane % 4;
  const int m0 = 16 * (warp % 4), r0 = m0 + g8;
  const T* vsrc = static_cast<const T*>(p.v) + (tok0 * H + h) * V;
  tile::fetch_tile<C, KP>(s.Ks, static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
  tile::fetch_tile<C, kWyBV>(s.Vs, vsrc, H * V, rows, min(kWyBV, p.V), p.vec_v && min(kWyBV, p.V) % 8 == 0);
  tile::cp_async_commit();
  chunk::load_rows(s.beta, p.beta + tok0 * H + h, H, rows);
  chunk::load_gamma(s.gam, p.g ? p.g + tok0 * H + h : nullptr, H, rows);
  tile::cp_async_wait<0>();
  __syncthreads();
  {  // KKE = (K K^T) o E on u <= r: warp w, rows m0.., columns 32 (w / 4)..
    constexpr int NJ = 4;
    const int n0 = 32 * (warp / 4);
    float acc[NJ][4];
    mma::zero_acc(acc);
    {
      uint32_t a[KP / 16][4];
#pragma unroll
      for (int kb = 0; kb < KP / 16; ++kb) mma::a_from_rows(a[kb], s.Ks, ld_h(KP), m0, 16 * kb);
      mma::mma_acc<true>(acc, a, s.Ks, ld_h(KP), n0);
    }
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + 8 * (e >> 1), u = n0 + 8 * j + 2 * t4 + (e & 1);
        s.KKE[r * ld_f(C) + u] = u <= r ? acc[j][e] * __expf(s.gam[r] - s.gam[u]) : 0.f;
      }
  }
  __syncthreads();
  {
    float t[C / 4];
    chunk::wy_substitute(s.KKE, s.beta, t);
    const int j = threadIdx.x / 4;
    const float bj = s.beta[j], bgj = bj * __expf(s.gam[j]);
#pragma unroll
    for (int i = 0; i < C / 4; ++i) {
      s.Tw[chunk::wy_row(i) * ld_h(C) + j] = tile::from_f<T>(t[i] * bgj);
      s.Tu[chunk::wy_row(i) * ld_h(C) + j] = tile::from_f<T>(t[i] * bj);
    }
    if (p.tm) {  // the backward's recompute keeps Tm (16-bit) for chunk_bwd
      T* tm = static_cast<T*>(p.tm) + (tok0 * H + h) * C + j;
#pragma unroll
      for (int i = 0; i < C / 4; ++i)
        if (chunk::wy_row(i) < rows) tm[chunk::wy_row(i) * H * C] = tile::from_f<T>(t[i]);
    }
  }
  __syncthreads();  // from here KKE is dead: its space is the warps' staging rows (8 x 2 KB) for the W / U stores
  T* stage = reinterpret_cast<T*>(s.KKE) + warp * 16 * 64;
  {  // W = Tw K: rows m0.., columns (KP / 2) (w / 4)..
    constexpr int NJ = KP / 16;
    const int n0 = (KP / 2) * (warp / 4);
    float acc[NJ][4];
    gemm_rows_cc<NJ, T>(acc, s.Tw, m0, s.Ks, ld_h(KP), n0);
    T* wdst = static_cast<T*>(p.w) + (tok0 * H + h) * K;
    if constexpr (NJ <= 8) {
      if (p.vec_k) {
        store_acc_rows_staged<NJ, T>(wdst, H * K, acc, stage, m0, n0, rows, p.K);
      } else {
        store_acc_rows<NJ, T>(wdst, H * K, acc, r0, n0, rows, p.K, K % 2 == 0);
      }
    } else {
      store_acc_rows<NJ, T>(wdst, H * K, acc, r0, n0, rows, p.K, K % 2 == 0);
    }
  }
  for (int v0 = 0; v0 < p.V; v0 += kWyBV) {  // U = Tu V: rows m0.., columns 64 (w / 4).. of the v-tile
    const int cols = min(kWyBV, p.V - v0);
    if (v0 > 0) {
      __syncthreads();  // every warp is done with the previous v-tile
      tile::fetch_tile<C, kWyBV>(s.Vs, vsrc + v0, H * V, rows, cols, p.vec_v && cols % 8 == 0);
      tile::cp_async_commit();
      tile::cp_async_wait<0>();
      __syncthreads();
    }
    constexpr int NJ = kWyBV / 16;
    const int n0 = (kWyBV / 2) * (warp / 4);
    float acc[NJ][4];
    gemm_rows_cc<NJ, T>(acc, s.Tu, m0, s.Vs, ld_h(kWyBV), n0);
    T* udst = static_cast<T*>(p.u) + (tok0 * H + h) * V + v0;
    if (p.vec_v && cols % 8 == 0) {
      store_acc_rows_staged<NJ, T>(udst, H * V, acc, stage, m0, n0, rows, cols);
    } else {
      store_acc_rows<NJ, T>(udst, H * V, acc, r0, n0, rows, cols, V % 2 == 0);
    }
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
// The chunk-local products on mma.sync, block = (slot, head, 64-column v-tile), 4 warps, warp w owns rows 16w..16w+15:
//   output (DVL false):  O = s diag(e^gamma) Q h_c + P Vn,      P = s (Q K^T o E), E[r][u] = e^(gamma_r - gamma_u), u <= r
//   dvl    (DVL true):   dVl = P^T dO = P' dO,                   P' = s (K Q^T o E^T) (rows: keys u, columns: queries r >= u)
// Rows come from A = Q (K), the score columns from B = K (Q); A's fragments serve the score and Q h; P stays in
// registers (its accumulator layout is the A operand of P Vn). Tiles arrive by cp.async; one block barrier; the result
// leaves through the warp's own rows of the A tile (dead once its fragments are loaded) in 16-byte stores.
constexpr int kOutWarps = 4, kOutBV = 64;

template <int KP, typename T>
struct OutputFwdSmem {
  T *As, *Bs, *Hs, *Vs;
  float* g;
  // with_h false (the P^T dO kernel): no state tile, 43 instead of 61 KB at KP 128 (4 blocks a multiprocessor, not 3).
  __host__ __device__ static size_t carve(char* base, OutputFwdSmem* s, bool with_h) {
    SmemCarver sc{base};
    OutputFwdSmem t;
    t.As = sc.take<T>(C * ld_h(KP));
    t.Bs = sc.take<T>(C * ld_h(KP));
    t.Hs = with_h ? sc.take<T>(KP * ld_h(kOutBV)) : nullptr;
    t.Vs = sc.take<T>(C * ld_h(kOutBV));
    t.g = sc.take<float>(C);
    if (s) *s = t;
    return sc.used;
  }
};

template <int KP, typename T, bool DVL>
__global__ void __launch_bounds__(kOutWarps * 32) chunk_local_kernel(BwdParams b) {
  constexpr int BV = kOutBV, NT = kOutWarps * 32, NV = BV / 8, NU = C / 8;
  static_assert(C * ld_h(KP) >= kOutWarps * 16 * BV, "a warp's 16 rows of the A tile hold its 16 x 64 staging rows");
  extern __shared__ __align__(128) char smem[];
  const FwdParams& p = b.f;
  OutputFwdSmem<KP, T> s;
  OutputFwdSmem<KP, T>::carve(smem, &s, !DVL);
  const int h = blockIdx.y, v0 = blockIdx.z * BV;
  const int cols = min(BV, p.V - v0);
  int n;
  int64_t c, bos, len;
  if (!p.seq.locate(blockIdx.x, n, c, bos, len)) return;
  const int rows = static_cast<int>(len - c * C < C ? len - c * C : C);
  const int64_t tok0 = bos + c * C, H = p.H, K = p.K, V = p.V, slot = blockIdx.x;
  const bool vec_v = p.vec_v && cols % 8 == 0;
  const T* qk[2] = {static_cast<const T*>(p.q), static_cast<const T*>(p.k)};
  tile::fetch_tile<C, KP, T, NT>(s.As, qk[DVL ? 1 : 0] + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
  tile::fetch_tile<C, KP, T, NT>(s.Bs, qk[DVL ? 0 : 1] + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
  if constexpr (!DVL)
    tile::fetch_tile<KP, BV, T, NT>(s.Hs, static_cast<const T*>(p.h) + (slot * H + h) * K * V + v0, V, p.K, cols, vec_v);
  const T* vals = static_cast<const T*>(DVL ? b.dout : p.vn);
  tile::fetch_tile<C, BV, T, NT>(s.Vs, vals + (tok0 * H + h) * V + v0, H * V, rows, cols, vec_v);
  if (p.g) tile::fetch_column<C, NT>(s.g, p.g + tok0 * H + h, H, rows);
  tile::cp_async_commit();
  tile::cp_async_wait<0>();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g8 = lane / 4, t4 = lane % 4;
  const int m0 = 16 * warp, r0 = m0 + g8, r1 = r0 + 8;
  float gr[2] = {0.f, 0.f}, gu[NU][2];  // gamma at this thread's rows and at its columns u = 8 j + 2 t + e
  if (p.g) {
    chunk::WarpGamma gm;
    gm.scan(s.g);
    gr[0] = gm.at(r0);
    gr[1] = gm.at(r1);
#pragma unroll
    for (int j = 0; j < NU; ++j) {
      gu[j][0] = gm.at(8 * j + 2 * t4);
      gu[j][1] = gm.at(8 * j + 2 * t4 + 1);
    }
  } else {
#pragma unroll
    for (int j = 0; j < NU; ++j) gu[j][0] = gu[j][1] = 0.f;
  }
  uint32_t qa[KP / 16][4];
#pragma unroll
  for (int kb = 0; kb < KP / 16; ++kb) mma::a_from_rows(qa[kb], s.As, ld_h(KP), m0, 16 * kb);
  float O[NV][4];
  mma::zero_acc(O);
  if constexpr (!DVL) {
    mma::mma_acc<false>(O, qa, s.Hs, ld_h(BV));  // O = Q h
    const float sr[2] = {p.scale * __expf(gr[0]), p.scale * __expf(gr[1])};
#pragma unroll
    for (int j = 0; j < NV; ++j) {  // O = s diag(e^gamma) Q h
      O[j][0] *= sr[0]; O[j][1] *= sr[0]; O[j][2] *= sr[1]; O[j][3] *= sr[1];
    }
  }
  float P[NU][4];
  mma::zero_acc(P);
  mma::mma_acc<true>(P, qa, s.Bs, ld_h(KP));  // P = Q K^T (P' = K Q^T)
#pragma unroll
  for (int j = 0; j < NU; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {  // P = s (Q K^T) e^(gamma_r - gamma_u) on u <= r (P': e^(gamma_u - gamma_r), u >= r)
      const int r = e < 2 ? r0 : r1, u = 8 * j + 2 * t4 + (e & 1);
      const float d = DVL ? gu[j][e & 1] - gr[e >> 1] : gr[e >> 1] - gu[j][e & 1];
      P[j][e] = (DVL ? u >= r : u <= r) ? p.scale * P[j][e] * __expf(d) : 0.f;
    }
#pragma unroll
  for (int ub = 0; ub < C / 16; ++ub) {  // O += P Vn (P' dO)
    uint32_t pa[1][4];
    mma::acc_to_a<T>(pa[0], P, ub);
    mma::mma_acc<false>(O, pa, s.Vs, ld_h(BV), 0, 16 * ub);
  }
  T* o = static_cast<T*>(DVL ? b.dvl : p.o) + (tok0 * H + h) * V + v0;
  if (vec_v) {
    store_acc_rows_staged<NV, T>(o, H * V, O, s.As + m0 * ld_h(KP), m0, 0, rows, cols);
  } else {
    store_acc_rows<NV, T>(o, H * V, O, r0, 0, rows, cols, V % 2 == 0);
  }
}

}  // namespace linflow::delta_rule
