// Deltaformer read pass on tensor cores (mma.sync m16n8k16, bf16/fp16 operands, fp32 accumulation), in the native
// layout: q [B,T,H,K], k [B,T,Hkv,K], u [B,T,Hkv,V] (u converted to q's dtype by the host), o [B,T,H,V]; query head
// h reads KV head h / (H / Hkv); sequences dense or packed (cu_seqlens), causal within each. Math (ALGORITHMS.md §3):
//   O = softmax_causal(s Q K^T) U,  lse_i = log sum_{j<=i} exp(s q_i.k_j)
//   backward (FlashAttention-2): P = exp(s Q K^T - lse), Drow = rowsum(dO o O), dS = P o (dO U^T - Drow),
//   dQ = s dS K,  dK = s dS^T Q,  dU = P^T dO
// Tiles are chunk::C = 64 rows of one sequence (slots of chunk::SeqLayout), taken in pairs (128 rows / keys a
// block); head dims are zero-padded to KP, VP in {64, 128}. Measured on the H100 (bf16, B8 T4096 H16 D128): forward
// 1.83 ms, backward 6.41 ms (the 64-row-block kernels they replaced: 1.99 / 9.74).
// Device code only: read_kernel.cu launches it; tests/cuda_emu compiles it on the CPU (read_main.cpp).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common/mma.cuh"
#include "common/seq_layout.h"
#include "common/tile.cuh"
#include "deltaformer/read.h"

namespace linflow::deltaformer::rdk {

using chunk::C;
using tile::ld_h;
constexpr int kWarps = 4, kThreads = kWarps * 32;  // forward: 4 warps of 32 query rows
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// Reductions over the 4 lanes (a quad) that share the rows of an accumulator fragment.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------------------------
// Drow = rowsum(dO o O) per (token, query head): one warp a row.
template <typename T>
__global__ void __launch_bounds__(256) read_drow_kernel(ReadBwdParams b, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32, V = b.f.V;
  const T* o = static_cast<const T*>(b.f.o) + row * V;
  const T* d = static_cast<const T*>(b.dout) + row * V;
  float acc = 0.f;
  for (int c = lane; c < V; c += 32) acc += tile::to_f(o[c]) * tile::to_f(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) b.drow[row] = acc;
}

// ---------------------------------------------------------------------------------------------------------------
// Backward. Block = (KV head hk, pair of
// key tiles c0, c0 + 1 = 128 keys), 8 warps, warp w owning keys 16w..16w+15; loops over the G query heads and the
// query tiles ib = c0..last (64 queries each) as one flat list, with Q, dO, lse, Drow of the next tile fetched
// (cp.async) into the other of two buffers while this one is computed. Per query tile, in two halves of 32 queries
// (fewer live registers; a warp skips a half its keys cannot see):
//   P^T = exp2(sl2 K Q^T - lse log2e) (masked)  dU += P^T dO,  dS^T = P^T o (U dO^T - Drow),  dK += dS^T Q
// dS^T -> shared memory; then warp w: dQ rows 16 (w % 4).., columns (w / 4) KP/2.. += s dS K over the 128 keys
// (k-blocks past the last visible key skipped), added with 8-byte vector atomics (red.global.add.v2.f32 on sm_90).
// 128 keys a block halve the dQ atomic traffic of 64-key blocks, the vector atomics its instruction count; the
// tile loads overlap the previous tile's compute. Dense blocks run longest-first (key-tile pair 0 of every sequence
// first); varlen blocks follow the slots, odd slots exit at once.
constexpr int kBwdWarps = 8, kBwdThreads = kBwdWarps * 32, BN = 2 * C;
static_assert(kBwdWarps * 16 == BN, "a warp owns 16 keys of the block");

template <int KP, int VP, typename T>
struct BwdSmem {
  static constexpr int kK = BN * ld_h(KP), kU = BN * ld_h(VP), kQ = C * ld_h(KP), kO = C * ld_h(VP),
                       kS = BN * ld_h(C);
  static constexpr size_t kBytes = sizeof(T) * (kK + kU + 2 * kQ + 2 * kO + kS) + 4 * C * sizeof(float);
};

// Blocks (per KV head) of the backward, and block -> (sequence, first key tile c0 (even), bos, len).
__host__ __device__ inline int64_t bwd_blocks(const chunk::SeqLayout& s, int64_t slots) {
  return s.cu ? slots : s.N * (((s.T + C - 1) / C + 1) / 2);
}
__device__ __forceinline__ bool bwd_locate(const chunk::SeqLayout& s, int64_t blk, int& n, int64_t& c0,
                                            int64_t& bos, int64_t& len) {
  if (!s.cu) {
    const int64_t pi = blk / s.N;
    n = static_cast<int>(blk % s.N);
    c0 = 2 * pi;
    bos = n * s.T;
    len = s.T;
    return c0 * C < len;
  }
  return s.locate(blk, n, c0, bos, len) && c0 % 2 == 0;
}

// dst[0], dst[1] += a, b (8-byte aligned): one vector reduction on sm_90.
__device__ __forceinline__ void red_add2(float* dst, float a, float b) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

template <int KP, int VP, typename T>
__global__ void __launch_bounds__(kBwdThreads) read_bwd_kernel(ReadBwdParams b) {
  constexpr int LK = ld_h(KP), LV = ld_h(VP), LS = ld_h(C), NT = kBwdThreads;
  using Sm = BwdSmem<KP, VP, T>;
  const ReadFwdParams& p = b.f;
  extern __shared__ __align__(128) char smem[];
  T* Ks = reinterpret_cast<T*>(smem);
  T* Us = Ks + Sm::kK;
  T* Qb = Us + Sm::kU;      // two buffers of Sm::kQ
  T* Ob = Qb + 2 * Sm::kQ;  // dO: two buffers of Sm::kO
  T* dSs = Ob + 2 * Sm::kO;  // dS^T: [key][query]
  float* stat = reinterpret_cast<float*>(dSs + Sm::kS);  // buffer i: lse at 2 C i, Drow at 2 C i + C
  const int hk = blockIdx.x % p.Hkv, G = p.H / p.Hkv;
  int n;
  int64_t c0, bos, len;
  if (!bwd_locate(p.seq, blockIdx.x / p.Hkv, n, c0, bos, len)) return;
  const int krows = static_cast<int>(min(static_cast<int64_t>(BN), len - c0 * C));
  const int64_t H = p.H, Hkv = p.Hkv, K = p.K, V = p.V, ktok0 = bos + c0 * C;
  const int nqt = static_cast<int>((len + C - 1) / C - c0);  // query tiles c0.. of one head
  const int iters = G * nqt;
  tile::fetch_tile<BN, KP, T, NT>(Ks, static_cast<const T*>(p.k) + (ktok0 * Hkv + hk) * K, Hkv * K, krows, p.K, true);
  tile::fetch_tile<BN, VP, T, NT>(Us, static_cast<const T*>(p.u) + (ktok0 * Hkv + hk) * V, Hkv * V, krows, p.V, true);
  auto fetch_q = [&](int it, int buf) {
    const int64_t h = static_cast<int64_t>(hk) * G + it / nqt, ib = c0 + it % nqt;
    const int qrows = static_cast<int>(min(static_cast<int64_t>(C), len - ib * C));
    const int64_t qtok0 = bos + ib * C;
    tile::fetch_tile<C, KP, T, NT>(Qb + buf * Sm::kQ, static_cast<const T*>(p.q) + (qtok0 * H + h) * K, H * K, qrows,
                                   p.K, true);
    tile::fetch_tile<C, VP, T, NT>(Ob + buf * Sm::kO, static_cast<const T*>(b.dout) + (qtok0 * H + h) * V, H * V,
                                   qrows, p.V, true);
    tile::fetch_column<C, NT>(stat + 2 * C * buf, p.lse + qtok0 * H + h, H, qrows);
    tile::fetch_column<C, NT>(stat + 2 * C * buf + C, b.drow + qtok0 * H + h, H, qrows);
  };
  fetch_q(0, 0);
  tile::cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g8 = lane / 4, t4 = lane % 4;
  const int m0 = 16 * warp, r0 = m0 + g8, r1 = r0 + 8;  // this warp's keys (rows of K, U, dK, dU, dS^T)
  const int mq = 16 * (warp % 4), nh = (warp / 4) * (KP / 2);  // dQ: query rows mq.., columns nh..
  const float sl2 = p.scale * kLog2e;
  float dK[KP / 8][4], dU[VP / 8][4];
  mma::zero_acc(dK);
  mma::zero_acc(dU);
  for (int it = 0; it < iters; ++it) {
    const int buf = it & 1;
    // the other buffer was last read before the previous iteration's middle barrier
    if (it + 1 < iters) fetch_q(it + 1, buf ^ 1);
    tile::cp_async_commit();
    tile::cp_async_wait<1>();
    __syncthreads();  // this tile landed for all threads; every warp is past the previous dQ step (dSs free)
    const int64_t h = static_cast<int64_t>(hk) * G + it / nqt, ib = c0 + it % nqt;
    const int qrows = static_cast<int>(min(static_cast<int64_t>(C), len - ib * C));
    const int64_t qtok0 = bos + ib * C;
    const T* Qs = Qb + buf * Sm::kQ;
    const T* dOs = Ob + buf * Sm::kO;
    const float* lse_s = stat + 2 * C * buf;
    const float* drow_s = lse_s + C;
    // key kr (0..BN) of the block visible to query qc of tile ib iff qc < qrows and qc - kr >= offset
    const int offset = static_cast<int>((c0 - ib) * C);  // 0 on the first tile, -C on the second, ...
#pragma unroll 1
    for (int q0 = 0; q0 < C; q0 += 32) {
      if (q0 >= qrows || q0 + 31 - m0 < offset) {  // no key of this warp sees a query of this half: dS^T = 0
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = q0 + 8 * j + 2 * t4;
          *reinterpret_cast<uint32_t*>(dSs + r0 * LS + col) = 0u;
          *reinterpret_cast<uint32_t*>(dSs + r1 * LS + col) = 0u;
        }
        continue;
      }
      float P[4][4];  // P^T: rows = this warp's keys, columns = queries q0..q0+31
      mma::zero_acc(P);
      mma::mma_rows<true, KP / 16>(P, Ks, LK, m0, Qs, LK, q0);  // S^T = K Q^T
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kr = e < 2 ? r0 : r1, qc = q0 + 8 * j + 2 * t4 + (e & 1);
          const bool visible = qc < qrows && qc - kr >= offset;
          P[j][e] = visible ? exp2f(P[j][e] * sl2 - lse_s[qc] * kLog2e) : 0.f;
        }
#pragma unroll
      for (int kb = 0; kb < 2; ++kb) {  // dU += P^T dO
        uint32_t pa[1][4];
        mma::acc_to_a<T>(pa[0], P, kb);
        mma::mma_acc<false>(dU, pa, dOs, LV, 0, q0 + 16 * kb);
      }
      float dS[4][4];  // dP^T = U dO^T, then dS^T = P^T o (dP^T - Drow)
      mma::zero_acc(dS);
      mma::mma_rows<true, VP / 16>(dS, Us, LV, m0, dOs, LV, q0);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dS[j][e] = P[j][e] * (dS[j][e] - drow_s[q0 + 8 * j + 2 * t4 + (e & 1)]);
#pragma unroll
      for (int kb = 0; kb < 2; ++kb) {  // dK += dS^T Q
        uint32_t pa[1][4];
        mma::acc_to_a<T>(pa[0], dS, kb);
        mma::mma_acc<false>(dK, pa, Qs, LK, 0, q0 + 16 * kb);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = q0 + 8 * j + 2 * t4;
        *reinterpret_cast<uint32_t*>(dSs + r0 * LS + col) = mma::pack2<T>(dS[j][0], dS[j][1]);
        *reinterpret_cast<uint32_t*>(dSs + r1 * LS + col) = mma::pack2<T>(dS[j][2], dS[j][3]);
      }
    }
    __syncthreads();  // dS^T complete; the Q, dO, lse, Drow buffer of this tile no longer read
    // dQ rows mq.. (columns nh..nh+KP/2) += s dS K over the keys some query of the tile sees
    const int kb_end = min(BN / 16, (qrows - 1 - offset) / 16 + 1);
    if (mq < qrows && nh < p.K) {
      float acc[KP / 16][4];
      mma::zero_acc(acc);
      for (int kb = 0; kb < kb_end; ++kb) {
        uint32_t sa[1][4];
        mma::a_from_cols(sa[0], dSs, LS, mq, 16 * kb);
        mma::mma_acc<false>(acc, sa, Ks, LK, nh, 16 * kb);
      }
      float* dq = b.dq + (qtok0 * H + h) * K;
#pragma unroll
      for (int j = 0; j < KP / 16; ++j)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = mq + g8 + 8 * i, col = nh + 8 * j + 2 * t4;  // K % 8 == 0: col < K implies col + 1 < K
          if (r < qrows && col < p.K) red_add2(dq + r * H * K + col, p.scale * acc[j][2 * i], p.scale * acc[j][2 * i + 1]);
        }
    }
  }

  float* dk = b.dk + (ktok0 * Hkv + hk) * K;
  float* du = b.du + (ktok0 * Hkv + hk) * V;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = i ? r1 : r0;
    if (r >= krows) continue;
#pragma unroll
    for (int j = 0; j < KP / 8; ++j) {
      const int col = 8 * j + 2 * t4;
      if (col < p.K)
        *reinterpret_cast<float2*>(dk + r * Hkv * K + col) =
            make_float2(p.scale * dK[j][2 * i], p.scale * dK[j][2 * i + 1]);
    }
#pragma unroll
    for (int j = 0; j < VP / 8; ++j) {
      const int col = 8 * j + 2 * t4;
      if (col < p.V) *reinterpret_cast<float2*>(du + r * Hkv * V + col) = make_float2(dU[j][2 * i], dU[j][2 * i + 1]);
    }
  }
}


// ---------------------------------------------------------------------------------------------------------------
// Forward. Block = (query head h, pair of query tiles c0, c0 + 1 = 128 rows), 4 warps of 32 rows (two m16 tiles:
// every K / U fragment read from shared memory feeds two mma.sync, half the shared-memory traffic per FLOP of 16
// rows a warp); Q fragments are read from shared memory per key tile (registers go to the two row tiles' O and S).
// The Q tile sits in shared memory; key tiles jb = 0..c stream through double-buffered shared memory (cp.async):
// S = Q K^T (scaled to log2 units, masked above the diagonal), online softmax per row (running max m, sum l),
// O = alpha O + P U with P fed from registers (acc_to_a). A warp skips a key tile none of its rows sees (the second diagonal tile for rows 0..63). Blocks run
// longest first: dense by descending tile pair over all sequences, varlen by descending slot (odd slots exit).
constexpr int BM = 2 * C;

template <int KP, int VP, typename T>
struct FwdSmem {
  static constexpr int kQ = BM * ld_h(KP), kK = C * ld_h(KP), kU = C * ld_h(VP);
  static constexpr size_t kBytes = sizeof(T) * (kQ + 2 * kK + 2 * kU);
};

__host__ __device__ inline int64_t fwd_blocks(const chunk::SeqLayout& s, int64_t slots) {
  return s.cu ? slots : s.N * (((s.T + C - 1) / C + 1) / 2);
}
// block (per head; the grid's count `nb`) -> (sequence, first query tile c0 (even), bos, len); longest first.
__device__ __forceinline__ bool fwd_locate(const chunk::SeqLayout& s, int64_t blk, int64_t nb, int& n, int64_t& c0,
                                            int64_t& bos, int64_t& len) {
  if (!s.cu) {
    const int64_t np = ((s.T + C - 1) / C + 1) / 2;
    n = static_cast<int>(blk % s.N);
    c0 = 2 * (np - 1 - blk / s.N);
    bos = n * s.T;
    len = s.T;
    return c0 >= 0;
  }
  return s.locate(nb - 1 - blk, n, c0, bos, len) && c0 % 2 == 0;
}

template <int KP, int VP, typename T>
__global__ void __launch_bounds__(kThreads) read_fwd_kernel(ReadFwdParams p) {
  constexpr int LK = ld_h(KP), LV = ld_h(VP), NV = VP / 8, NS = C / 8;
  using S = FwdSmem<KP, VP, T>;
  extern __shared__ __align__(128) char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* const Ks[2] = {Qs + S::kQ, Qs + S::kQ + S::kK};
  T* const Us[2] = {Qs + S::kQ + 2 * S::kK, Qs + S::kQ + 2 * S::kK + S::kU};
  const int h = blockIdx.x % p.H, hk = h / (p.H / p.Hkv);
  int n;
  int64_t c0, bos, len;
  if (!fwd_locate(p.seq, blockIdx.x / p.H, gridDim.x / p.H, n, c0, bos, len)) return;
  const int rows = static_cast<int>(min(static_cast<int64_t>(BM), len - c0 * C));
  const int64_t H = p.H, Hkv = p.Hkv, K = p.K, V = p.V, tok0 = bos + c0 * C;
  const int64_t jlast = c0 + (rows - 1) / C;  // last key tile: the block's last query tile
  const T* kseq = static_cast<const T*>(p.k) + (bos * Hkv + hk) * K;
  const T* useq = static_cast<const T*>(p.u) + (bos * Hkv + hk) * V;
  auto fetch_kv = [&](int64_t jb, int buf) {
    const int kr = static_cast<int>(min(static_cast<int64_t>(C), len - jb * C));
    tile::fetch_tile<C, KP, T, kThreads>(buf ? Ks[1] : Ks[0], kseq + jb * C * Hkv * K, Hkv * K, kr, p.K, true);
    tile::fetch_tile<C, VP, T, kThreads>(buf ? Us[1] : Us[0], useq + jb * C * Hkv * V, Hkv * V, kr, p.V, true);
  };
  tile::fetch_tile<BM, KP, T, kThreads>(Qs, static_cast<const T*>(p.q) + (tok0 * H + h) * K, H * K, rows, p.K, true);
  fetch_kv(0, 0);
  tile::cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g8 = lane / 4, t4 = lane % 4;
  const int m0 = 32 * warp;  // row tiles m0.., m0 + 16..; thread rows m0 + g8 + 8 i (i = 0..3)
  const float sl2 = p.scale * kLog2e;
  float O[2][NV][4];
  mma::zero_acc(O[0]);
  mma::zero_acc(O[1]);
  float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, l[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t jb = 0; jb <= jlast; ++jb) {
    const int buf = static_cast<int>(jb & 1);
    if (jb < jlast) fetch_kv(jb + 1, buf ^ 1);
    tile::cp_async_commit();
    tile::cp_async_wait<1>();
    __syncthreads();
    // key u of tile jb visible to row r iff jb C + u <= c0 C + r; offset = (jb - c0) C: u - r <= -offset
    const int offset = static_cast<int>((jb - c0) * C);
    if (offset <= m0 + 31) {  // else no row of this warp sees a key of this tile
      const T* Kt = buf ? Ks[1] : Ks[0];
      const T* Ut = buf ? Us[1] : Us[0];
      float Sc[2][NS][4];
      mma::zero_acc(Sc[0]);
      mma::zero_acc(Sc[1]);
#pragma unroll
      for (int kb = 0; kb < KP / 16; ++kb) {  // S = Q K^T, one B fragment for both row tiles
        uint32_t a0[1][4], a1[1][4];
        mma::a_from_rows(a0[0], Qs, LK, m0, 16 * kb);
        mma::a_from_rows(a1[0], Qs, LK, m0 + 16, 16 * kb);
        mma::mma_acc2<true>(Sc[0], a0, Sc[1], a1, Kt, LK, 0, 16 * kb);
      }
      const bool diag = offset > m0 - C;  // some key of the tile lies past some row of the warp
      float mx[4] = {m[0], m[1], m[2], m[3]};
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = 2 * t + (e >> 1), r = m0 + g8 + 8 * i, u = 8 * j + 2 * t4 + (e & 1);
            const float x = diag && u + offset > r ? -INFINITY : Sc[t][j][e] * sl2;
            Sc[t][j][e] = x;
            mx[i] = fmaxf(mx[i], x);
          }
      float base[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        mx[i] = quad_max(mx[i]);
        base[i] = mx[i] == -INFINITY ? 0.f : mx[i];  // a row without keys so far: no -inf - -inf
        const float alpha = exp2f(m[i] - base[i]);   // m = -inf (first tile): 0
        m[i] = mx[i];
        l[i] *= alpha;
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          O[i >> 1][j][2 * (i & 1)] *= alpha;
          O[i >> 1][j][2 * (i & 1) + 1] *= alpha;
        }
      }
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = 2 * t + (e >> 1);
            Sc[t][j][e] = exp2f(Sc[t][j][e] - base[i]);
            l[i] += Sc[t][j][e];
          }
#pragma unroll
      for (int kb = 0; kb < C / 16; ++kb) {  // O += P U, one B fragment for both row tiles
        uint32_t pa0[1][4], pa1[1][4];
        mma::acc_to_a<T>(pa0[0], Sc[0], kb);
        mma::acc_to_a<T>(pa1[0], Sc[1], kb);
        mma::mma_acc2<false>(O[0], pa0, O[1], pa1, Ut, LV, 0, 16 * kb);
      }
    }
    __syncthreads();  // the next iteration's fetch overwrites this tile's buffers
  }

  T* o = static_cast<T*>(p.o) + (tok0 * H + h) * V;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = m0 + g8 + 8 * i;
    const float lsum = quad_sum(l[i]);  // >= 1 for a row of the sequence: the row max contributes exp2(0)
    if (r >= rows) continue;
    const float inv = 1.f / lsum;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = 8 * j + 2 * t4;  // V % 8 == 0: col < V implies col + 1 < V
      if (col < p.V)
        *reinterpret_cast<uint32_t*>(o + r * H * V + col) =
            mma::pack2<T>(O[i >> 1][j][2 * (i & 1)] * inv, O[i >> 1][j][2 * (i & 1) + 1] * inv);
    }
    if (t4 == 0) p.lse[(tok0 + r) * H + h] = (m[i] + __log2f(lsum)) * kLn2;
  }
}
}  // namespace linflow::deltaformer::rdk
