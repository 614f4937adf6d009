// Deltaformer write pass BACKWARD on mma.sync (ALGORITHMS.md §3; the ATen reference is write_backward in
// chunk_aten.cpp). Device code only (write_bwd_kernel.cu launches it; tests/cuda_emu compiles it on the CPU).
// Per write head, s = scale, rows i, keys j, P_ij = exp(s w_i.k_j - lse_i) for j < i, given dU = dL/dU:
//   dV = (I + diag(beta) P)^-T dU,   dbeta_i = -dV_i.R_i,   Delta_i = beta_i dbeta_i,
//   dA_ij = P_ij (dP_ij - Delta_i) = -P_ij (b_i.U_j + Delta_i)  with b_i = beta_i dV_i,
//   dW = s dA K,   dK = s dA^T W.
// Two kernels:
//  (1) write_bwd_dv_kernel: the dependency chain. One block per (sequence, write head) walks the chunks in
//      reverse; chunk c needs pend_c[j] = sum_{i in later chunks} P_ij b_i (an attention transpose: the chunk's
//      keys against the later write queries), then solves (I + diag(beta) P_cc)^T dV_c = dU_c - pend_c. It writes
//      dV (fp32), dbeta, Delta and b = beta dV as a 16-bit shadow (the tensor-core operand of later chunks).
//  (2) write_bwd_pair_kernel<KEYS>: chunk parallel, FlashAttention-backward-like, given b, Delta, lse. KEYS =
//      false: block = a row chunk, loops over key chunks j <= i, dW; KEYS = true: block = a key chunk, loops over
//      row chunks i >= j, dK. Both recompute P and b.U^T on tensor cores (no atomics).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common/chunk.cuh"
#include "common/mma.cuh"
#include "common/seq_layout.h"
#include "common/tile.cuh"

namespace linflow::deltaformer::wbwd {
using chunk::C;
using tile::ld_f;
using tile::ld_h;

constexpr int kWarps = 8, kThreads = kWarps * 32;  // 4 row slices x 2 groups (alternate chunks of the loop)
static_assert(kThreads == tile::kThreads, "tile helpers and wy_substitute assume 256 threads");
constexpr float kLog2e = 1.4426950408889634f;

struct WriteBwdParams {
  const void *k, *w;     // [B,T,Hkv,K], element type T (w = k when absent)
  const void* u16;       // [B,T,Hkv,V] element type T: 16-bit copy of the forward's u
  void* b16;             // [B,T,Hkv,V] element type T: b = beta dV (written by (1), read by (1) and (2))
  const float* beta;     // [B,T,Hkv] or null (beta = 1)
  const float *lse, *r, *du;  // lse_w [B,T,Hkv] (natural log), r [B,T,Hkv,V], du [B,T,Hkv,V]
  float *dv, *dbeta, *delta;  // [B,T,Hkv,V], [B,T,Hkv], [B,T,Hkv] (Delta, scratch)
  float *dw, *dk;             // [B,T,Hkv,K]
  chunk::SeqLayout seq;
  int H;      // write (KV) heads
  float sl2;  // scale * log2(e)
  float scale;
};

__host__ __device__ constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }
__host__ __device__ constexpr size_t round128(size_t b) { return (b + 127) / 128 * 128; }

// (1) shared memory: A0 Kc (C x K half) / Pcc (fp32 C x C); A1 Wc / Tm; S0, S1 stages of two later chunks each:
// W (2C x K), b (2C x V) halves, lse (2C fp32); S1 after the loop: Ps (group 1's partial pend), Ys (fp32 C x V);
// small: beta, lse of the chunk.
template <int K, int V, typename T>
struct DvSmem {
  static constexpr size_t half = round128(cmax(C * ld_h(K) * sizeof(T), C * ld_f(C) * sizeof(float)));
  static constexpr size_t stage = round128(2 * C * (ld_h(K) + ld_h(V)) * sizeof(T) + 2 * C * sizeof(float));
  static constexpr size_t fp = round128(2 * C * ld_f(V) * sizeof(float));
  static constexpr size_t a0 = 0, a1 = half, s0 = 2 * half, s1 = s0 + stage, small = s1 + cmax(stage, fp);
  static constexpr size_t total = small + 2 * C * sizeof(float);
};

// (1): block = (sequence, write head), 8 warps; warp w owns key rows 16 (w % 4).. of chunk c and handles the later
// chunks c + 1 + 2 st + w / 4. Per chunk c (reverse order):
//  1. Wc, Kc, beta, lse -> smem; K slice as mma A fragments.
//  2. later chunks in stages (cp.async double buffer): S^T = s K_c W_i^T, P^T = exp2(S^T - lse_i) (columns),
//     pend += P^T b_i (P^T from registers as the A operand, b_i rows as B).
//  3. group 0: P_cc (diagonal, strictly lower, from S^T of K_c W_c); group 1 hands pend over; Y = dU_c - pend.
//  4. Tm = (I + diag(beta) P_cc)^-1 (chunk::wy_substitute); dV_c = Tm^T Y on CUDA cores (thread: 4 rows x V/16
//     columns); dbeta = -dV.R (half-warp shuffles); dv, dbeta, Delta, b16 to global; prefetch of chunk c-1's stage.
template <int K, int V, typename T>
__global__ void __launch_bounds__(kThreads, 1) write_bwd_dv_kernel(WriteBwdParams p) {
  using L = DvSmem<K, V, T>;
  constexpr int NK = K / 16, NV = V / 8, NS = C / 8, LK = ld_h(K), LV = ld_h(V), LF = ld_f(V), LC = ld_f(C);
  constexpr int CPT = V / 16;
  extern __shared__ __align__(128) char smem[];
  T* Kc = reinterpret_cast<T*>(smem + L::a0);
  float* Pcc = reinterpret_cast<float*>(smem + L::a0);
  T* Wc = reinterpret_cast<T*>(smem + L::a1);
  float* Tm = reinterpret_cast<float*>(smem + L::a1);
  float* Ps = reinterpret_cast<float*>(smem + L::s1);
  float* Ys = Ps + C * LF;
  float* beta_s = reinterpret_cast<float*>(smem + L::small);
  float* lse_s = beta_s + C;

  int64_t bos, len;
  p.seq.seq(static_cast<int>(blockIdx.x), bos, len);
  if (len <= 0) return;
  const int h = blockIdx.y;
  const int64_t H = p.H, HK = H * K, HV = H * V;
  const T* kg = static_cast<const T*>(p.k) + h * K;
  const T* wg = static_cast<const T*>(p.w) + h * K;
  T* bg = static_cast<T*>(p.b16) + h * V;
  const float* lseg = p.lse + h;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g8 = lane / 4, t4 = lane % 4;
  const int grp = warp / 4, m0 = 16 * (warp % 4), r0 = m0 + g8, r1 = r0 + 8;
  const int nc = static_cast<int>((len + C - 1) / C);

  // Stage st of the later chunks of chunk cc: chunks cc + 1 + 2 st + q (q = 0, 1) < nc, into buffer st % 2.
  auto fetch_stage = [&](int st, int cc) {
    T* wb = reinterpret_cast<T*>(smem + L::s0 + (st & 1) * L::stage);
    T* db = wb + 2 * C * LK;
    float* lb = reinterpret_cast<float*>(db + 2 * C * LV);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int ch = cc + 1 + 2 * st + q;
      if (ch >= nc) break;
      const int64_t tok = bos + static_cast<int64_t>(ch) * C;
      const int rw = static_cast<int>(len - static_cast<int64_t>(ch) * C < C ? len - static_cast<int64_t>(ch) * C : C);
      tile::fetch_tile<C, K, T, kThreads>(wb + q * C * LK, wg + tok * HK, HK, rw, K, true);
      tile::fetch_tile<C, V, T, kThreads>(db + q * C * LV, bg + tok * HV, HV, rw, V, true);
      tile::fetch_column<C, kThreads>(lb + q * C, lseg + tok * H, H, rw);
    }
  };

  for (int c = nc - 1; c >= 0; --c) {
    const int64_t tok0 = bos + static_cast<int64_t>(c) * C;
    const int rows = static_cast<int>(len - static_cast<int64_t>(c) * C < C ? len - static_cast<int64_t>(c) * C : C);
    // ---- 1. the chunk's W, K, beta, lse
    tile::fetch_tile<C, K, T, kThreads>(Wc, wg + tok0 * HK, HK, rows, K, true);
    tile::fetch_tile<C, K, T, kThreads>(Kc, kg + tok0 * HK, HK, rows, K, true);
    tile::fetch_column<C, kThreads>(lse_s, lseg + tok0 * H, H, rows);
    if (p.beta) {
      tile::fetch_column<C, kThreads>(beta_s, p.beta + tok0 * H + h, H, rows);
    } else {
      for (int i = tid; i < C; i += kThreads) beta_s[i] = i < rows ? 1.f : 0.f;
    }
    tile::cp_async_commit();
    tile::cp_async_wait<0>();  // also the first stage, prefetched by the previous chunk
    __syncthreads();
    uint32_t ka[NK][4];
#pragma unroll
    for (int kb = 0; kb < NK; ++kb) mma::a_from_rows(ka[kb], Kc, LK, m0, 16 * kb);
    float acc[NV][4];
    mma::zero_acc(acc);
    __syncthreads();  // Kc is dead from here (Pcc takes its place)

    // ---- 2. later chunks
    const int nlater = nc - 1 - c, nst = (nlater + 1) / 2;
    for (int st = 0; st < nst; ++st) {
      if (st + 1 < nst) {
        fetch_stage(st + 1, c);
        tile::cp_async_commit();
        tile::cp_async_wait<1>();
      } else {
        tile::cp_async_wait<0>();
      }
      __syncthreads();
      if (2 * st + grp < nlater) {
        const T* wb = reinterpret_cast<const T*>(smem + L::s0 + (st & 1) * L::stage);
        const T* db = wb + 2 * C * LK + grp * C * LV;
        const float* lb = reinterpret_cast<const float*>(wb + 2 * C * (LK + LV)) + grp * C;
        wb += grp * C * LK;
        float x[NS][4];
        mma::zero_acc(x);
        mma::mma_acc<true>(x, ka, wb, LK);  // K_c W_i^T: rows keys, columns write rows i
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = 8 * j + 2 * t4 + (e & 1);
            x[j][e] = exp2f(x[j][e] * p.sl2 - lb[col] * kLog2e);  // j < i always; rows past the end: b = 0
          }
#pragma unroll
        for (int kb2 = 0; kb2 < C / 16; ++kb2) {  // pend += P^T b_i
          uint32_t pa[1][4];
          mma::acc_to_a<T>(pa[0], x, kb2);
          mma::mma_acc<false>(acc, pa, db, LV, 0, 16 * kb2);
        }
      }
      __syncthreads();  // buffer st % 2 is refilled at st + 1
    }

    // ---- 3. diagonal (group 0), pend of group 1 -> smem, Y = dU - pend
    if (grp == 0) {
      float x[NS][4];
      mma::zero_acc(x);
      mma::mma_acc<true>(x, ka, Wc, LK);  // K_c W_c^T
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = e < 2 ? r0 : r1, row = 8 * j + 2 * t4 + (e & 1);
          Pcc[row * LC + key] =
              (key < row && row < rows) ? exp2f(x[j][e] * p.sl2 - lse_s[row] * kLog2e) : 0.f;
        }
    } else {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int col = 8 * j + 2 * t4;
        *reinterpret_cast<float2*>(Ps + r0 * LF + col) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(Ps + r1 * LF + col) = make_float2(acc[j][2], acc[j][3]);
      }
    }
    __syncthreads();
    if (grp == 0) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int col = 8 * j + 2 * t4;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int rr = hh ? r1 : r0;
          const float2 o1 = *reinterpret_cast<const float2*>(Ps + rr * LF + col);
          float2 y = make_float2(0.f, 0.f);
          if (rr < rows) {
            const float2 d = *reinterpret_cast<const float2*>(p.du + (tok0 + rr) * HV + h * V + col);
            y = make_float2(d.x - (acc[j][2 * hh] + o1.x), d.y - (acc[j][2 * hh + 1] + o1.y));
          }
          *reinterpret_cast<float2*>(Ys + rr * LF + col) = y;
        }
      }
    }
    __syncthreads();

    // ---- 4. the solve inside the chunk
    {
      float t[C / 4];
      chunk::wy_substitute(Pcc, beta_s, t);  // Tm = (I + diag(beta) Pcc)^-1 (Wc is dead: Tm takes its place)
      const int j = tid / 4;
#pragma unroll
      for (int i = 0; i < C / 4; ++i) Tm[chunk::wy_row(i) * LC + j] = t[i];
    }
    __syncthreads();
    const int cg = tid % 16, rg = tid / 16;  // rows rg + 16 i, columns cg * CPT ..
    float o[4][CPT];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < CPT; ++e) o[i][e] = 0.f;
#pragma unroll 4
    for (int kk = 0; kk < C; ++kk) {  // dV_c = Tm^T Y
      float y[CPT];
#pragma unroll
      for (int e = 0; e < CPT; e += 2) {
        const float2 yy = *reinterpret_cast<const float2*>(Ys + kk * LF + cg * CPT + e);
        y[e] = yy.x;
        y[e + 1] = yy.y;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float a = Tm[kk * LC + rg + 16 * i];
#pragma unroll
        for (int e = 0; e < CPT; ++e) o[i][e] = fmaf(a, y[e], o[i][e]);
      }
    }
    float2 rv[4][CPT / 2];  // R rows, all loaded before any store below (a store that may alias p.r
#pragma unroll              // would serialise the loads: one DRAM latency each)
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < CPT; e += 2)
        rv[i][e / 2] = rg + 16 * i < rows
                           ? *reinterpret_cast<const float2*>(p.r + (tok0 + rg + 16 * i) * HV + h * V + cg * CPT + e)
                           : make_float2(0.f, 0.f);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int rr = rg + 16 * i;
      const bool ok = rr < rows;
      const int64_t off = (tok0 + rr) * HV + h * V + cg * CPT;
      float part = 0.f;
#pragma unroll
      for (int e = 0; e < CPT; e += 2) {
        if (ok) {
          part = fmaf(o[i][e], rv[i][e / 2].x, fmaf(o[i][e + 1], rv[i][e / 2].y, part));
          *reinterpret_cast<float2*>(p.dv + off + e) = make_float2(o[i][e], o[i][e + 1]);
          const float b = beta_s[rr];
          *reinterpret_cast<uint32_t*>(static_cast<T*>(p.b16) + off + e) = mma::pack2<T>(b * o[i][e], b * o[i][e + 1]);
        }
      }
#pragma unroll
      for (int s = 1; s < 16; s *= 2) part += __shfl_xor_sync(0xffffffff, part, s);  // the 16 threads of row rr
      if (ok && cg == 0) {
        p.dbeta[(tok0 + rr) * H + h] = -part;
        p.delta[(tok0 + rr) * H + h] = -part * beta_s[rr];
      }
    }
    __threadfence_block();
    __syncthreads();  // b_c is in global memory (read back by the earlier chunks' stages); smem free
    if (c > 0) {
      fetch_stage(0, c - 1);  // into buffer 0 (Ps / Ys live in buffer 1)
      tile::cp_async_commit();
    }
  }
}

// (2) shared memory: OWN the block's chunk (A1: C x K, A2: C x V halves), later the group-1 partial output (fp32
// C x K); S0, S1 stages of two other chunks each: X2 (2C x K), Y2 (2C x V) halves, lse and Delta (2C fp32 each);
// small: lse and Delta of the own chunk.
template <int K, int V, typename T>
struct PairSmem {
  static constexpr size_t own = round128(cmax(C * (ld_h(K) + ld_h(V)) * sizeof(T), C * ld_f(K) * sizeof(float)));
  static constexpr size_t stage = round128(2 * C * (ld_h(K) + ld_h(V)) * sizeof(T) + 4 * C * sizeof(float));
  static constexpr size_t s0 = own, s1 = s0 + stage, small = s1 + stage;
  static constexpr size_t total = small + 2 * C * sizeof(float);
};

// (2): block = (chunk slot, write head), 8 warps; warp w owns rows 16 (w % 4).. of its chunk and the other chunks
// o = 2 st + w / 4 of the loop. KEYS = false (dW): own = write rows i (A1 = W, A2 = b), others = key chunks
// j <= i (X2 = K, Y2 = U). KEYS = true (dK): own = keys j (A1 = K, A2 = U), others = row chunks i >= j (X2 = W,
// Y2 = b). Per other chunk: X = A1 X2^T, Y = A2 Y2^T (mma), G = -exp2(s X - lse_i) (Y + Delta_i) on valid
// pairs (j < i, i < len), out += G X2 (G from registers as the A operand). The two groups add up through smem;
// out * s goes to dW / dK (fp32).
template <int K, int V, typename T, bool KEYS>
__global__ void __launch_bounds__(kThreads, 1) write_bwd_pair_kernel(WriteBwdParams p) {
  using L = PairSmem<K, V, T>;
  constexpr int NK = K / 16, NVB = V / 16, NS = C / 8, NO = K / 8, LK = ld_h(K), LV = ld_h(V), LFK = ld_f(K);
  extern __shared__ __align__(128) char smem[];
  T* A1s = reinterpret_cast<T*>(smem);
  T* A2s = A1s + C * LK;
  float* red = reinterpret_cast<float*>(smem);
  float* lse_o = reinterpret_cast<float*>(smem + L::small);
  float* del_o = lse_o + C;

  int n;
  int64_t c64, bos, len;
  // dW blocks (KEYS = false) run in reverse slot order: the late chunks, with the most key chunks, start first.
  const int64_t slot = KEYS ? static_cast<int64_t>(blockIdx.x) : static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  if (!p.seq.locate(slot, n, c64, bos, len)) return;
  const int c = static_cast<int>(c64);
  const int h = blockIdx.y;
  const int64_t H = p.H, HK = H * K, HV = H * V;
  const T* kg = static_cast<const T*>(p.k) + h * K;
  const T* wg = static_cast<const T*>(p.w) + h * K;
  const T* ug = static_cast<const T*>(p.u16) + h * V;
  const T* bg = static_cast<const T*>(p.b16) + h * V;
  const T* a1g = KEYS ? kg : wg;
  const T* a2g = KEYS ? ug : bg;
  const T* x2g = KEYS ? wg : kg;
  const T* y2g = KEYS ? bg : ug;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g8 = lane / 4, t4 = lane % 4;
  const int grp = warp / 4, m0 = 16 * (warp % 4), r0 = m0 + g8, r1 = r0 + 8;
  const int nc = static_cast<int>((len + C - 1) / C);
  const int64_t tok0 = bos + static_cast<int64_t>(c) * C;
  const int rows = static_cast<int>(len - static_cast<int64_t>(c) * C < C ? len - static_cast<int64_t>(c) * C : C);
  const int nother = KEYS ? nc - c : c + 1, nst = (nother + 1) / 2;

  auto other_chunk = [&](int o) { return KEYS ? c + o : o; };
  auto fetch_stage = [&](int st) {
    T* xb = reinterpret_cast<T*>(smem + L::s0 + (st & 1) * L::stage);
    T* yb = xb + 2 * C * LK;
    float* lb = reinterpret_cast<float*>(yb + 2 * C * LV);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int o = 2 * st + q;
      if (o >= nother) break;
      const int ch = other_chunk(o);
      const int64_t tok = bos + static_cast<int64_t>(ch) * C;
      const int rw = static_cast<int>(len - static_cast<int64_t>(ch) * C < C ? len - static_cast<int64_t>(ch) * C : C);
      tile::fetch_tile<C, K, T, kThreads>(xb + q * C * LK, x2g + tok * HK, HK, rw, K, true);
      tile::fetch_tile<C, V, T, kThreads>(yb + q * C * LV, y2g + tok * HV, HV, rw, V, true);
      if (KEYS) {
        tile::fetch_column<C, kThreads>(lb + q * C, p.lse + tok * H + h, H, rw);
        tile::fetch_column<C, kThreads>(lb + 2 * C + q * C, p.delta + tok * H + h, H, rw);
      }
    }
  };

  tile::fetch_tile<C, K, T, kThreads>(A1s, a1g + tok0 * HK, HK, rows, K, true);
  tile::fetch_tile<C, V, T, kThreads>(A2s, a2g + tok0 * HV, HV, rows, V, true);
  if (!KEYS) {
    tile::fetch_column<C, kThreads>(lse_o, p.lse + tok0 * H + h, H, rows);
    tile::fetch_column<C, kThreads>(del_o, p.delta + tok0 * H + h, H, rows);
  }
  fetch_stage(0);
  tile::cp_async_commit();
  tile::cp_async_wait<0>();
  __syncthreads();
  uint32_t a1[NK][4], a2[NVB][4];
#pragma unroll
  for (int kb = 0; kb < NK; ++kb) mma::a_from_rows(a1[kb], A1s, LK, m0, 16 * kb);
#pragma unroll
  for (int kb = 0; kb < NVB; ++kb) mma::a_from_rows(a2[kb], A2s, LV, m0, 16 * kb);
  float lo2[2] = {0.f, 0.f}, dlo[2] = {0.f, 0.f};
  if (!KEYS) {
    lo2[0] = lse_o[r0] * kLog2e;
    lo2[1] = lse_o[r1] * kLog2e;
    dlo[0] = del_o[r0];
    dlo[1] = del_o[r1];
  }
  float out[NO][4];
  mma::zero_acc(out);

  for (int st = 0; st < nst; ++st) {
    if (st > 0) {
      if (st + 1 < nst) {
        fetch_stage(st + 1);
        tile::cp_async_commit();
        tile::cp_async_wait<1>();
      } else {
        tile::cp_async_wait<0>();
      }
      __syncthreads();
    } else if (nst > 1) {
      fetch_stage(1);  // buffer 1: untouched so far
      tile::cp_async_commit();
    }
    const int o = 2 * st + grp;
    if (o < nother) {
      const int c2 = other_chunk(o);
      const T* xb = reinterpret_cast<const T*>(smem + L::s0 + (st & 1) * L::stage);
      const T* yb = xb + 2 * C * LK + grp * C * LV;
      const float* lb = reinterpret_cast<const float*>(xb + 2 * C * (LK + LV)) + grp * C;
      xb += grp * C * LK;
      float x[NS][4], y[NS][4];
      mma::zero_acc(x);
      mma::zero_acc(y);
      mma::mma_acc<true>(x, a1, xb, LK);
      mma::mma_acc<true>(y, a2, yb, LV);
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rl = e < 2 ? r0 : r1, cl = 8 * j + 2 * t4 + (e & 1);
          const int a = c * C + rl, b = c2 * C + cl;  // own / other positions in the sequence
          const bool valid = KEYS ? (a < b && b < len) : (b < a && a < len);
          const float l2 = KEYS ? lb[cl] * kLog2e : lo2[e >> 1];
          const float dl = KEYS ? lb[2 * C + cl] : dlo[e >> 1];
          x[j][e] = valid ? -exp2f(x[j][e] * p.sl2 - l2) * (y[j][e] + dl) : 0.f;
        }
#pragma unroll
      for (int kb2 = 0; kb2 < C / 16; ++kb2) {  // out += G X2
        uint32_t ga[1][4];
        mma::acc_to_a<T>(ga[0], x, kb2);
        mma::mma_acc<false>(out, ga, xb, LK, 0, 16 * kb2);
      }
    }
    __syncthreads();  // buffer st % 2 is refilled at st + 2
  }
  // ---- the two groups add up; out * s to global
  if (grp == 1) {
#pragma unroll
    for (int j = 0; j < NO; ++j) {
      const int col = 8 * j + 2 * t4;
      *reinterpret_cast<float2*>(red + r0 * LFK + col) = make_float2(out[j][0], out[j][1]);
      *reinterpret_cast<float2*>(red + r1 * LFK + col) = make_float2(out[j][2], out[j][3]);
    }
  }
  __syncthreads();
  if (grp == 0) {
    float* dst = (KEYS ? p.dk : p.dw) + h * K;
#pragma unroll
    for (int j = 0; j < NO; ++j) {
      const int col = 8 * j + 2 * t4;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int rr = hh ? r1 : r0;
        if (rr >= rows) continue;
        const float2 o1 = *reinterpret_cast<const float2*>(red + rr * LFK + col);
        *reinterpret_cast<float2*>(dst + (tok0 + rr) * HK + col) =
            make_float2(p.scale * (out[j][2 * hh] + o1.x), p.scale * (out[j][2 * hh + 1] + o1.y));
      }
    }
  }
}

}  // namespace linflow::deltaformer::wbwd
