// LION forward, chunked form (ALGORITHMS.md §4), bf16/fp16 operands on tensor cores (mma.sync m16n8k16), fp32
// accumulation, no K x V state in memory. Per sequence and head, with forward / backward log gates gf, gb
// (as in lion_aten.cpp: none = 0, fixed = log lam, selective = g [one token late for "lion_code"] / g_backward):
//   PF_i = sum_{j <= i} e^(cF_i - cF_j) (q_i.k_j) v_j     (forward sweep, diagonal included)
//   PB_i = sum_{j >  i} e^(cB_j - cB_i) (q_i.k_j) v_j     (backward sweep, strict)
//   o = s (PF + PB)  or, normalised, s (PF + PB) / (s (DF + DB) + eps), D = the same sums with v_j = 1.
// Chunks of C = 64 tokens; gamma = the within-chunk inclusive cumsum of the sweep's gate, gL = gamma_{C-1}
// (rows past a sequence end have gate 0 and k = v = 0). The sweeps walk the chunks in their direction with the
// state S (K x V, transposed, in registers) of everything already passed:
//   forward,  chunk c:  P = diag(e^gamma) Q S + ((Q K^T) o EF) V,   EF[r,u] = e^(gamma_r - gamma_u) (u <= r)
//                       S = e^gL S + K^T diag(e^(gL - gamma)) V
//   backward, chunk c:  P = diag(e^(gL - gamma)) Q S + ((Q K^T) o EB) V,   EB[r,u] = e^(gamma_u - gamma_r) (u > r)
//                       S = e^gL S + K^T diag(e^gamma) V
// (every exponent <= 0). The denominator runs the same recurrences with a K-vector state z in shared memory (fp32,
// scalar FMAs) and the row sums of the masked score block.
//
// Two launches of one kernel (sweep_kernel<.., BWD>): grid (v-tiles of BV = 16 NW columns, H, sequences), NW warps.
// The forward sweep writes its fp32 partial numerators (in the accumulator layout: one float4 a thread per 8-token
// group, fully coalesced) and denominators to workspaces; the backward sweep stages them a chunk ahead (cp.async,
// like its tiles: plain loads in the epilogue cost a DRAM round trip a chunk), adds its own, normalises, writes o.
// Warp w owns value columns 16 w.. of the tile: S^T (16 x KP) and the chunk's output O^T (16 x C) are m16n8
// accumulators; O^T = S^T Q^T and S^T += (V^T diag(kd)) K are warp-local register GEMMs (state_mma.cuh's pattern),
// the masked score block A = (Q K^T) o E is computed once a block (warp w: rows 16 (w % 4).., columns split over
// w / 4), stored to shared memory in 16 bits and read back as the B operand of O^T += V^T A^T. Tiles stream in by
// cp.async (two stages); two block barriers a chunk.
//
// Backward (lion_bwd; cuda_host.cpp bwd_kernels has the math): the gradients of a
// symmetric mask are LION products again, so the same launch pair runs them in gradient mode (GR = true):
//   o = s (PF + PB) unnormalised, with an optional rank-one score term: scores q_r . k_u + a_r b_u (ext; the
//   ones column of V' = [V, 1] and its gradient g0). Intra-chunk it is added to the score block before the mask;
//   across chunks each thread keeps w_u = sum over passed tokens of decay b_j v_j[u] for its two value columns
//   (updated like S: w = e^gL w + V^T diag(kd b), the 4 lanes of a column group splitting the tokens) and adds
//   fac_r a_r w_u to O^T. The forward sweep can write the diagonal scores (diag: q_t . k_t + a_t b_t, fp32).
//   Row dots (rowx): the backward sweep's launch streams a C x BV tile of x with the chunk (cp.async, two more
//   stages); rowdot_r = s x_r . (PF_r - PB_r) (the per-direction dot products of dg), reduced over the 8 column
//   groups of a warp by shuffles and over the warps in shared memory (one extra barrier a chunk); it needs all of a
//   row's columns in one block (V <= BV). The last sweep also forms dg itself (dg_rows: the reverse cumsum runs
//   with the backward sweep's chunk order). In forward mode (the recompute launch of the normalised backward) x = dO
//   and the launch writes G = s dO inv (as o) and g0 = -s inv (dO . o) (as rowdot), inv = 1 / (s D + eps).
#pragma once
#include "common/chunk.cuh"
#include "common/mma.cuh"
#include "common/tile.cuh"
#include "lion/launch.h"

namespace linflow::lion {

using chunk::C;
using tile::ld_f;
using tile::ld_h;

// Shared memory of sweep_kernel: two stages of Q, K (C x KP), V (C x BV) and the gate column, the masked score
// block (C x C, 16-bit), per-row gate factors and the denominator's scratch. Every piece starts 128-byte aligned.
template <int KP, int NW, typename T>
struct SweepSmem {
  static constexpr int BV = 16 * NW, NSPLIT = NW / 4;
  static constexpr size_t align(size_t b) { return (b + 127) / 128 * 128; }
  static constexpr size_t kQ = align(sizeof(T) * C * ld_h(KP)), kV = align(sizeof(T) * C * ld_h(BV));
  static constexpr size_t kA = align(sizeof(T) * C * ld_h(C)), kCol = align(sizeof(float) * C);
  static constexpr size_t kZ = align(sizeof(float) * KP);
  static constexpr size_t kP = align(sizeof(float) * C * BV);
  // bwd: two stages of the forward sweep's partials and denominators (the backward sweep reads them a chunk ahead);
  // rowx: two more stages of a C x BV tile, the row-dot operand x (backward use; the launcher passes p.rowx != null)
  static constexpr size_t bytes(bool bwd, bool rowx) {
    return 2 * (2 * kQ + kV + kCol) + kA + (3 + NSPLIT) * kCol + kZ + (4 + NW) * kCol + (bwd ? 2 * (kP + kCol) : 0) +
           (rowx ? 2 * kV : 0);
  }

  T *Q[2], *K[2], *V[2], *A, *X[2];
  float *g[2], *fac, *kd, *deni, *dsum[NSPLIT], *z;
  float *ea[2], *eb[2], *rd;  // backward use: rank-one score factors (two stages), per-warp row-dot partials [NW][C]
  float *pf[2], *dF[2];  // backward sweep, two stages: the forward sweep's partials (its accumulator layout), dens
  __device__ explicit SweepSmem(char* base) {
    size_t o = 0;
    auto take = [&](size_t n) { char* r = base + o; o += n; return r; };
    for (int b = 0; b < 2; ++b) {
      Q[b] = reinterpret_cast<T*>(take(kQ));
      K[b] = reinterpret_cast<T*>(take(kQ));
      V[b] = reinterpret_cast<T*>(take(kV));
      g[b] = reinterpret_cast<float*>(take(kCol));
    }
    A = reinterpret_cast<T*>(take(kA));
    fac = reinterpret_cast<float*>(take(kCol));
    kd = reinterpret_cast<float*>(take(kCol));
    deni = reinterpret_cast<float*>(take(kCol));
    for (int i = 0; i < NSPLIT; ++i) dsum[i] = reinterpret_cast<float*>(take(kCol));
    z = reinterpret_cast<float*>(take(kZ));
    for (int b = 0; b < 2; ++b) {
      ea[b] = reinterpret_cast<float*>(take(kCol));
      eb[b] = reinterpret_cast<float*>(take(kCol));
    }
    rd = reinterpret_cast<float*>(take(NW * kCol));  // kCol == C floats
    for (int b = 0; b < 2; ++b) {  // only there with bytes(bwd = true)
      pf[b] = reinterpret_cast<float*>(take(kP));
      dF[b] = reinterpret_cast<float*>(take(kCol));
    }
    for (int b = 0; b < 2; ++b) X[b] = reinterpret_cast<T*>(take(kV));  // last: only there with bytes(.., true)
  }
};

// Sum of 16 values v[2 j + i] a thread over the 8 lanes of its column group (lanes t, t + 4, .., t + 28), as a
// reduce-scatter (14 shuffles instead of 48): at each step a lane keeps half of its values and adds the partner's
// copy of that half, the half chosen by the lane-index bit. Ends with v[i] = the sum of v[2 g8 + i], g8 = lane / 4.
__device__ __forceinline__ void column_group_sum(float (&v)[16]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 8; n >= 2; n /= 2) {  // lane bit 16 / 8 / 4 picks the upper half of v[0 .. 2 n)
    const bool up = lane & (2 * n);
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const float other = __shfl_xor_sync(0xffffffff, up ? v[i] : v[i + n], 2 * n);
      v[i] = (up ? v[i + n] : v[i]) + other;
    }
  }
}

// The gate gradient of a chunk from the last gradient sweep's row dots (warp 0, lane L: rows 2 L, 2 L + 1, val = the
// rows' s k . (dkF - dkB)): dg_pre = rq + val - 2 s hv qk (cuda_host.cpp bwd_kernels), dg = its reverse cumsum over the
// sequence: a suffix scan over the chunk's rows plus `carry`, the sum over the later chunks (the sweep runs backward).
__device__ __forceinline__ void dg_rows(const FwdParams& p, const float (&val)[2], int64_t tok0, int h, int rows,
                                        float& carry) {
  const int lane = threadIdx.x % 32;
  float pre[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = 2 * lane + i;
    const int64_t t = (tok0 + r) * p.H + h;
    pre[i] = r < rows ? p.rq[t] + val[i] - 2.f * p.scale * p.hv[t] * p.qk[t] : 0.f;
  }
  float x = pre[0] + pre[1];  // inclusive suffix sum over the lanes
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float y = __shfl_down_sync(0xffffffff, x, off);
    if (lane + off < 32) x += y;
  }
  const float r0 = carry + x, r1 = r0 - pre[0];
  if (2 * lane < rows) p.dg[(tok0 + 2 * lane) * p.H + h] = r0;
  if (2 * lane + 1 < rows) p.dg[(tok0 + 2 * lane + 1) * p.H + h] = r1;
  carry += __shfl_sync(0xffffffff, x, 0);
}

// One direction's sweep over the chunks of one (sequence, head, v-tile); see the file comment. BWD = false: the
// forward sweep (chunks ascending, writes part / den); BWD = true: the backward sweep (chunks descending, reads
// part / den, writes o). Requires NW in {4, 8} (the score block splits over 4 row tiles), KP in {64, 128}.
// GR = true: gradient mode (see "Backward" below): the rank-one score term, rowdot of PF - PB.
template <int KP, int NW, bool BWD, typename T, bool GR = false>
__global__ void __launch_bounds__(NW * 32) sweep_kernel(FwdParams p) {
  constexpr int BV = 16 * NW, NT = 32 * NW, NK = KP / 8, NR = C / 8, NSPLIT = NW / 4, NJS = NR / NSPLIT;
  constexpr int TPR = NT / C;  // threads a row in the denominator's q.z
  static_assert(NW == 4 || NW == 8, "the score block is split over 4 row tiles x NW / 4 column groups");
  static_assert(KP == 64 || KP == 128, "K <= 128");
  extern __shared__ __align__(128) char smem[];
  const SweepSmem<KP, NW, T> s(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g8 = lane / 4, t4 = lane % 4;
  const int vt = blockIdx.x, v0 = vt * BV, h = blockIdx.y, n = blockIdx.z;
  const int cols = min(BV, p.V - v0), ua = 16 * warp + g8, ub = ua + 8;
  int64_t bos, len;
  p.seq.seq(n, bos, len);
  const int64_t nc = (len + C - 1) / C, slot0 = p.seq.first_slot(n, bos), H = p.H, K = p.K, V = p.V;
  const bool vec_v = p.vec_v && cols % 8 == 0;
  const bool den_here = p.normalize && (BWD || vt == 0);  // block-uniform
  const float* gsrc = BWD ? p.gb : p.gf;
  const int shift = (!BWD && p.gf_shift) ? 1 : 0;
  const float lam_log = p.lam_log ? p.lam_log[h] : 0.f;
  const T *q = static_cast<const T*>(p.q), *k = static_cast<const T*>(p.k), *v = static_cast<const T*>(p.v);
  auto rows_of = [&](int64_t c) { return static_cast<int>(len - c * C < C ? len - c * C : C); };

  auto prefetch = [&](int64_t c) {
    const int b = c & 1, rows = rows_of(c);
    const int64_t tok0 = bos + c * C;
    tile::fetch_tile<C, KP, T, NT>(b ? s.Q[1] : s.Q[0], q + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
    tile::fetch_tile<C, KP, T, NT>(b ? s.K[1] : s.K[0], k + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
    tile::fetch_tile<C, BV, T, NT>(b ? s.V[1] : s.V[0], v + (tok0 * H + h) * V + v0, H * V, rows, cols, vec_v);
    if (BWD && p.rowx)  // the row-dot operand, same layout as V (zero past rows / cols)
      tile::fetch_tile<C, BV, T, NT>(b ? s.X[1] : s.X[0], static_cast<const T*>(p.rowx) + (tok0 * H + h) * V + v0,
                                     H * V, rows, cols, vec_v);
    float* gd = b ? s.g[1] : s.g[0];
    if (gsrc) {  // selective: token tok0 + r - shift, within the sequence
      for (int r = threadIdx.x; r < C; r += NT) {
        const int64_t t = tok0 + r - shift;
        const bool valid = r < rows && t >= bos;
        tile::cp_async4(gd + r, valid ? gsrc + t * H + h : gsrc, valid);
      }
    } else {  // fixed (log lam) or none (0); nothing else writes this buffer
      for (int r = threadIdx.x; r < C; r += NT) gd[r] = r < rows ? lam_log : 0.f;
    }
    if constexpr (BWD) {  // the epilogue's inputs, a chunk ahead (plain loads there would stall every chunk)
      const int64_t slot = slot0 + c;
      const float* src = p.part + ((slot * H + h) * gridDim.x + vt) * (C * BV);
      float* dst = b ? s.pf[1] : s.pf[0];
      for (int i = threadIdx.x; i < C * BV / 4; i += NT) tile::cp_async16(dst + 4 * i, src + 4 * i, true);
      if (p.normalize) tile::fetch_column<C, NT>(b ? s.dF[1] : s.dF[0], p.den + (slot * H + h) * C, 1, C);
    }
    if constexpr (GR) {
      if (p.ext) {  // rank-one factors, 0 past the sequence end (null: ones)
        const float* src[2] = {p.ext_a, p.ext_b};
        float* dst[2] = {b ? s.ea[1] : s.ea[0], b ? s.eb[1] : s.eb[0]};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          if (src[i]) tile::fetch_column<C, NT>(dst[i], src[i] + tok0 * H + h, H, rows);
          else for (int r = threadIdx.x; r < C; r += NT) dst[i][r] = r < rows ? 1.f : 0.f;
        }
      }
    }
    tile::cp_async_commit();
  };

  float S[NK][4];  // S^T: rows = value columns ua / ub, cols = k index 8 j + 2 t (+1)
  mma::zero_acc(S);
  float w[2] = {0.f, 0.f};  // GR, ext: w_u = sum over passed tokens of decay b_j v_j[u], u = ua / ub
  float dgc = 0.f;          // GR, dg: the gate gradient summed over the chunks already passed (warp 0)
  for (int i = threadIdx.x; i < KP; i += NT) s.z[i] = 0.f;
  if (nc > 0) prefetch(BWD ? nc - 1 : 0);
  for (int64_t it = 0; it < nc; ++it) {
    const int64_t c = BWD ? nc - 1 - it : it;
    const int b = c & 1, rows = rows_of(c);
    const int64_t tok0 = bos + c * C, slot = slot0 + c;
    tile::cp_async_wait<0>();
    __syncthreads();  // B1: chunk c's tiles landed; every warp is done with chunk c -/+ 1's buffers and scratch
    if (it + 1 < nc) prefetch(BWD ? c - 1 : c + 1);
    const T *Qs = b ? s.Q[1] : s.Q[0], *Ks = b ? s.K[1] : s.K[0], *Vs = b ? s.V[1] : s.V[0];
    const float *ea = b ? s.ea[1] : s.ea[0], *eb = b ? s.eb[1] : s.eb[0];
    const bool ext = GR && p.ext;  // block-uniform
    chunk::WarpGamma gm;
    gm.scan(b ? s.g[1] : s.g[0]);
    const float gL = gm.last();

    {  // masked scores A = (Q K^T) o E: rows m0.., columns n0.. (NJS 8-column tiles); A -> smem (16-bit), row sums
      const int m0 = 16 * (warp % 4), n0 = (warp / 4) * 8 * NJS, r0 = m0 + g8, r1 = r0 + 8;
      uint32_t qa[KP / 16][4];
#pragma unroll
      for (int kb = 0; kb < KP / 16; ++kb) mma::a_from_rows(qa[kb], Qs, ld_h(KP), m0, 16 * kb);
      float A[NJS][4];
      mma::zero_acc(A);
      mma::mma_acc<true>(A, qa, Ks, ld_h(KP), n0);  // B[k][u] = K[u][k]
      const float gr[2] = {gm.at(r0), gm.at(r1)};
      float rs[2] = {0.f, 0.f};
      const float ar[2] = {ext ? ea[r0] : 0.f, ext ? ea[r1] : 0.f};
#pragma unroll
      for (int j = 0; j < NJS; ++j) {
        const int u = n0 + 8 * j + 2 * t4;
        const float gu[2] = {gm.at(u), gm.at(u + 1)};
        if (ext) {  // scores q_r . k_u + a_r b_u
          const float bu[2] = {eb[u], eb[u + 1]};
#pragma unroll
          for (int e = 0; e < 4; ++e) A[j][e] += ar[e >> 1] * bu[e & 1];
        }
        if constexpr (GR && !BWD) {
          if (p.diag) {  // the fp32 score of each token with itself (block-uniform branch)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = e < 2 ? r0 : r1;
              if (u + (e & 1) == r && r < rows) p.diag[(tok0 + r) * H + h] = A[j][e];
            }
          }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e < 2 ? r0 : r1, uu = u + (e & 1);
          const float d = BWD ? gu[e & 1] - gr[e >> 1] : gr[e >> 1] - gu[e & 1];
          const bool keep = BWD ? uu > r : uu <= r;
          const float x = keep ? A[j][e] * __expf(d) : 0.f;  // select: a dropped exponent may be > 0
          A[j][e] = x;
          rs[e >> 1] += x;
        }
        *reinterpret_cast<uint32_t*>(s.A + r0 * ld_h(C) + u) = mma::pack2<T>(A[j][0], A[j][1]);
        *reinterpret_cast<uint32_t*>(s.A + r1 * ld_h(C) + u) = mma::pack2<T>(A[j][2], A[j][3]);
      }
      if (den_here) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          rs[i] += __shfl_xor_sync(0xffffffff, rs[i], 1);
          rs[i] += __shfl_xor_sync(0xffffffff, rs[i], 2);
        }
        if (t4 == 0) {
          float* ds = s.dsum[0];
          if constexpr (NSPLIT > 1) ds = warp >= 4 ? s.dsum[1] : s.dsum[0];
          ds[r0] = rs[0];
          ds[r1] = rs[1];
        }
      }
    }
    if (warp == 0) {  // per-row factors: fac = inter-chunk row factor, kd = state-update column factor
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = 2 * lane + i;
        const float gr = i ? gm.x : gm.x - gm.b;
        s.fac[r] = BWD ? __expf(gL - gr) : __expf(gr);
        s.kd[r] = BWD ? __expf(gr) : __expf(gL - gr);
      }
    }
    if (den_here) {  // inter-chunk denominator: fac_r (q_r . z), TPR threads a row
      const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
      float d = 0.f;
#pragma unroll 8
      for (int i = part; i < KP; i += TPR) d += tile::to_f(Qs[r * ld_h(KP) + i]) * s.z[i];
#pragma unroll
      for (int off = 1; off < TPR; off *= 2) d += __shfl_xor_sync(0xffffffff, d, off);
      const float gr = gm.at(r);
      if (part == 0) s.deni[r] = d * (BWD ? __expf(gL - gr) : __expf(gr));
    }
    __syncthreads();  // B2: A, fac, kd, dsum, deni visible; every thread has read z

    uint32_t va[C / 16][4];  // V^T (16 value columns x C tokens) as A fragments
#pragma unroll
    for (int kb = 0; kb < C / 16; ++kb) mma::a_from_cols(va[kb], Vs, ld_h(BV), 16 * warp, 16 * kb);
    float O[NR][4];  // O^T: rows = value columns ua / ub, cols = tokens r = 8 j + 2 t (+1)
    {
      uint32_t sa[KP / 16][4];
#pragma unroll
      for (int kb = 0; kb < KP / 16; ++kb) mma::acc_to_a<T>(sa[kb], S, kb);
      mma::zero_acc(O);
      mma::mma_acc<true>(O, sa, Qs, ld_h(KP));  // O^T = S^T Q^T
    }
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      const float f0 = s.fac[8 * j + 2 * t4], f1 = s.fac[8 * j + 2 * t4 + 1];
      O[j][0] *= f0; O[j][1] *= f1; O[j][2] *= f0; O[j][3] *= f1;
      if (ext) {  // + fac_r a_r w_u: the rank-one term against the state
        const float a0 = f0 * ea[8 * j + 2 * t4], a1 = f1 * ea[8 * j + 2 * t4 + 1];
        O[j][0] += a0 * w[0]; O[j][1] += a1 * w[0]; O[j][2] += a0 * w[1]; O[j][3] += a1 * w[1];
      }
    }
    // O^T += V^T A^T (B[u][r] = A[r][u], as mma_acc<true>), skipping the 16 x 16 blocks the mask zeroes: tokens
    // r in 16 pr.. (accumulators 2 pr, 2 pr + 1) see u in 16 kb.. only for kb <= pr (forward) / kb >= pr (backward).
#pragma unroll
    for (int pr = 0; pr < C / 16; ++pr)
#pragma unroll
      for (int kb = 0; kb < C / 16; ++kb) {
        if (BWD ? kb < pr : kb > pr) continue;
        uint32_t bf[4];
        mma::b_from_rows(bf, s.A, ld_h(C), 16 * pr, 16 * kb);
        mma::mma16816<T>(O[2 * pr], va[kb], bf[0], bf[1]);
        mma::mma16816<T>(O[2 * pr + 1], va[kb], bf[2], bf[3]);
      }

    float* part = p.part + ((slot * H + h) * gridDim.x + vt) * (C * BV);  // C * BV == NR * 4 * NT
    if constexpr (!BWD) {
#pragma unroll
      for (int j = 0; j < NR; ++j)
        *reinterpret_cast<float4*>(part + (j * NT + threadIdx.x) * 4) = make_float4(O[j][0], O[j][1], O[j][2], O[j][3]);
      if (den_here && threadIdx.x < C) {
        const int r = threadIdx.x;
        float d = s.deni[r] + s.dsum[0][r];
        if constexpr (NSPLIT > 1) d += s.dsum[1][r];
        p.den[(slot * H + h) * C + r] = d;
      }
    } else {
      // y = s (PF + PB) inv (inv = 1 / (s D + eps) normalised, else 1); first every element (the partials' loads
      // all issue before the first store), then the stores. Row dot of x (the X tile): GR: s x . (PF - PB);
      // forward mode (the recompute launch): o := s x inv (= G) and rowdot := -s inv (x . y) (= g0).
      const bool hx = p.rowx != nullptr;  // block-uniform
      const T* Xs = b ? s.X[1] : s.X[0];
      const float* dF = b ? s.dF[1] : s.dF[0];
      const float* pfs = b ? s.pf[1] : s.pf[0];
      auto row_inv = [&](int r) {
        if (!p.normalize) return 1.f;
        float d = s.deni[r] + s.dsum[0][r] + dF[r];
        if constexpr (NSPLIT > 1) d += s.dsum[1][r];
        return 1.f / (p.scale * d + p.eps);
      };
      float rdp[2 * NR];  // per-thread partial row dots: rdp[2 j + i] for row 8 j + 2 t + i
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        const float4 f = *reinterpret_cast<const float4*>(pfs + (j * NT + threadIdx.x) * 4);
        const float pf[4] = {f.x, f.y, f.z, f.w};
        const float inv[2] = {row_inv(8 * j + 2 * t4), row_inv(8 * j + 2 * t4 + 1)};
        rdp[2 * j] = rdp[2 * j + 1] = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 8 * j + 2 * t4 + (e & 1), u = e < 2 ? ua : ub;
          const float y = p.scale * (O[j][e] + pf[e]) * inv[e & 1];
          const float xv = hx ? tile::to_f(Xs[r * ld_h(BV) + u]) : 0.f;
          rdp[2 * j + (e & 1)] += xv * (GR ? pf[e] - O[j][e] : y);
          O[j][e] = (!GR && hx) ? p.scale * xv * inv[e & 1] : y;
        }
      }
      if (p.o) {
        T* o = static_cast<T*>(p.o) + (tok0 * H + h) * V + v0;
#pragma unroll
        for (int j = 0; j < NR; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = 8 * j + 2 * t4 + (e & 1), u = e < 2 ? ua : ub;
            if (r < rows && u < cols) o[static_cast<int64_t>(r) * H * V + u] = tile::from_f<T>(O[j][e]);
          }
      }
      if (hx) {  // row dots: sum over the 8 column groups of the warp (lanes g8), then over the warps
        column_group_sum(rdp);
        s.rd[warp * C + 8 * g8 + 2 * t4] = rdp[0];
        s.rd[warp * C + 8 * g8 + 2 * t4 + 1] = rdp[1];
        __syncthreads();  // rd complete (block-uniform branch); rd is next written after the next chunk's B2
        if (warp == 0) {  // lane L: rows 2 L, 2 L + 1
          float val[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int r = 2 * lane + i;
            float acc = 0.f;
#pragma unroll
            for (int w_ = 0; w_ < NW; ++w_) acc += s.rd[w_ * C + r];
            val[i] = GR ? p.scale * acc : -p.scale * row_inv(r) * acc;
            if (p.rowdot && r < rows) p.rowdot[(tok0 + r) * H + h] = val[i];
          }
          if constexpr (GR) {
            if (p.dg) dg_rows(p, val, tok0, h, rows, dgc);
          }
        }
      }
    }

    // state update: S^T = e^gL S^T + (V^T diag(kd)) K;  z = e^gL z + K^T kd
    const float eC = __expf(gL);
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[j][e] *= eC;
#pragma unroll
    for (int rb = 0; rb < C / 16; ++rb) {
      uint32_t a[1][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // a[i] holds tokens 16 rb + 8 (i / 2) + 2 t, +1
        const int r = 16 * rb + 8 * (i / 2) + 2 * t4;
        const float2 f = mma::unpack2<T>(va[rb][i]);
        a[0][i] = mma::pack2<T>(f.x * s.kd[r], f.y * s.kd[r + 1]);
      }
      mma::mma_acc<false>(S, a, Ks, ld_h(KP), 0, 16 * rb);  // B[u][k] = K[u][k]
    }
    if (ext) {  // w = e^gL w + V^T diag(kd b): the 4 lanes of a column group split the tokens
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int u = i ? ub : ua;
        float acc = 0.f;
#pragma unroll 4
        for (int r = t4; r < C; r += 4) acc += s.kd[r] * eb[r] * tile::to_f(Vs[r * ld_h(BV) + u]);
        acc += __shfl_xor_sync(0xffffffff, acc, 1);
        acc += __shfl_xor_sync(0xffffffff, acc, 2);
        w[i] = w[i] * eC + acc;
      }
    }
    if (den_here) {  // ZS adjacent lanes a k index, tokens interleaved, combined by shuffles
      constexpr int ZS = NT / KP;
      static_assert(ZS >= 1 && ZS <= 4 && NT == ZS * KP, "every thread takes part in the z update");
      const int i = threadIdx.x / ZS, zp = threadIdx.x % ZS;
      float zi = 0.f;
#pragma unroll 8
      for (int u = zp; u < C; u += ZS) zi += s.kd[u] * tile::to_f(Ks[u * ld_h(KP) + i]);
#pragma unroll
      for (int off = 1; off < ZS; off *= 2) zi += __shfl_xor_sync(0xffffffff, zi, off);
      if (zp == 0) s.z[i] = s.z[i] * eC + zi;
    }
  }
}

}  // namespace linflow::lion
