// Delta rule backward kernels (ALGORITHMS.md §1). After recomputing w, u (wy_fwd) and the chunk-start states h
// and new values vn (state_fwd), with dO' = s dO, P = s (Q K^T o E), Qg = s diag(e^gamma) Q, Kd = diag(e^(gamma_C-gamma)) K:
//   local_dvn + state_bwd_mma (state_mma.cuh), chunks in reverse:  dh_c = dS (gradient at the chunk's end),
//       dVn = P^T dO + Kd dS,  dS <- e^gamma_C dS + Qg^T dO - W^T dVn                    -> dh, dvn, dh0
//   chunk_bwd (slot, head), loop over v-tiles:  dVb = Tm^T dVn, dv = beta dVb,
//       dZ = dO' Vn^T, dA = -dVb Vn^T (= -(dVb U^T + dKb W^T), since W h = U - Vn),
//       dQg = dO' h^T, dKd = Vn dh^T, dKb = -dVb h^T   (register accumulators)
//     then dq, dk, dbeta, dg from those (quotient-free: every term is a product of chunk-local tiles).
#pragma once
#include "delta_rule/kernels.cuh"

namespace linflow::delta_rule {


// ---------------------------------------------------------------------------------------------------------------
constexpr int kBwdBV = 32;

template <int KP, typename T>
struct ChunkBwdSmem {
  T *Qs, *Ks, *Tmh;
  float *KKE, *dZ, *dA;
  float *beta, *gam, *dbeta, *dgam, *hd, *srow, *red;
  char* region;  // phases reuse one region: the inverse, then the v-tiles, then the C x KP staging
  // inverse phase
  float* Tm;
  // v-loop phase
  T *dO, *Vn, *dvn, *Vt, *Ht, *dHt, *dVbn;
  float* dVbf;
  // final phase
  float *S1, *S2, *P;
  T *dQKh, *Gh;
  __host__ __device__ static size_t carve(char* base, ChunkBwdSmem* s) {
    constexpr int BV = kBwdBV;
    SmemCarver sc{base};
    ChunkBwdSmem t;
    t.Qs = sc.take<T>(C * ld_h(KP));
    t.Ks = sc.take<T>(C * ld_h(KP));
    t.Tmh = sc.take<T>(C * ld_h(C));
    t.KKE = sc.take<float>(C * ld_f(C));
    t.dZ = sc.take<float>(C * ld_f(C));
    t.dA = sc.take<float>(C * ld_f(C));
    t.beta = sc.take<float>(C);
    t.gam = sc.take<float>(C);
    t.dbeta = sc.take<float>(C);
    t.dgam = sc.take<float>(C);
    t.hd = sc.take<float>(C);
    t.srow = sc.take<float>(C);
    t.red = sc.take<float>(32);
    const size_t region_at = sc.used;
    t.region = base + region_at;
    SmemCarver a{t.region};
    t.Tm = a.take<float>(C * ld_f(C));
    SmemCarver v{t.region};
    t.dO = v.take<T>(C * ld_h(BV));
    t.Vn = v.take<T>(C * ld_h(BV));
    t.dvn = v.take<T>(C * ld_h(BV));
    t.Vt = v.take<T>(C * ld_h(BV));
    t.Ht = v.take<T>(KP * ld_h(BV));
    t.dHt = v.take<T>(KP * ld_h(BV));
    t.dVbn = v.take<T>(C * ld_h(BV));
    t.dVbf = v.take<float>(C * ld_f(BV));
    SmemCarver f{t.region};
    t.S1 = f.take<float>(C * ld_f(KP));
    t.S2 = f.take<float>(C * ld_f(KP));
    t.P = f.take<float>(C * ld_f(C));
    t.dQKh = f.take<T>(C * ld_h(C));
    t.Gh = f.take<T>(C * ld_h(C));
    size_t region = a.used > v.used ? a.used : v.used;
    region = region > f.used ? region : f.used;
    if (s) *s = t;
    return region_at + region;
  }
};

// Sum of one value per thread over the block (256 threads); every thread gets the result.
__device__ __forceinline__ float block_sum(float x, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffff, x, o);
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < tile::kThreads / 32; ++w) t += red[w];
  return t;
}

template <int KP, typename T>
__global__ void __launch_bounds__(256) chunk_bwd_kernel(BwdParams b) {
  constexpr int BV = kBwdBV, NT = (C / 16) * (KP / 16) / 8;
  extern __shared__ __align__(128) char smem[];
  const FwdParams& p = b.f;
  ChunkBwdSmem<KP, T> s;
  ChunkBwdSmem<KP, T>::carve(smem, &s);
  const int h = blockIdx.y;
  int n;
  int64_t c, bos, len;
  if (!p.seq.locate(blockIdx.x, n, c, bos, len)) return;
  const int rows = static_cast<int>(len - c * C < C ? len - c * C : C);
  const int64_t tok0 = bos + c * C, H = p.H, K = p.K, V = p.V, slot = blockIdx.x;
  const bool gated = p.g != nullptr;

  tile::load_tile<C, KP>(s.Qs, static_cast<const T*>(p.q) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
  tile::load_tile<C, KP>(s.Ks, static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
  chunk::load_rows(s.beta, p.beta + tok0 * H + h, H, rows);
  chunk::load_gamma(s.gam, gated ? p.g + tok0 * H + h : nullptr, H, rows);
  for (int i = threadIdx.x; i < C * C; i += blockDim.x) s.dZ[(i / C) * ld_f(C) + i % C] = s.dA[(i / C) * ld_f(C) + i % C] = 0.f;
  if (threadIdx.x < C) {
    s.dbeta[threadIdx.x] = 0.f;
    s.srow[threadIdx.x] = p.scale;
  }
  __syncthreads();
  chunk::wy_inverse<KP>(s.Ks, s.beta, s.gam, s.KKE, s.Tm);
  tile::to_half_tile<C, C>(s.Tmh, s.Tm);
  __syncthreads();

  tile::FragAcc dQg[NT], dKd[NT], dKb[NT];
  tile::zero_frags(dQg);
  tile::zero_frags(dKd);
  tile::zero_frags(dKb);
  float hs_part = 0.f;  // sum over the chunk-start state and its end gradient of h o dh
  for (int v0 = 0; v0 < p.V; v0 += BV) {
    const int cols = min(BV, p.V - v0);
    const bool vec = p.vec_v && cols % 8 == 0;
    const int64_t tv = (tok0 * H + h) * V + v0, sv = (slot * H + h) * K * V + v0;
    tile::load_tile<C, BV>(s.dO, static_cast<const T*>(b.dout) + tv, H * V, rows, cols, vec, s.srow);  // s dO
    tile::load_tile<C, BV>(s.Vn, static_cast<const T*>(p.vn) + tv, H * V, rows, cols, vec);
    tile::load_tile<C, BV>(s.dvn, static_cast<const T*>(b.dvn) + tv, H * V, rows, cols, vec);
    tile::load_tile<C, BV>(s.Vt, static_cast<const T*>(p.v) + tv, H * V, rows, cols, vec);
    tile::load_tile<KP, BV>(s.Ht, static_cast<const T*>(p.h) + sv, V, p.K, cols, vec);
    tile::load_tile<KP, BV>(s.dHt, static_cast<const T*>(b.dh) + sv, V, p.K, cols, vec);
    __syncthreads();
    tile::gemm<C, C, BV, true, false, true>(s.dO, ld_h(BV), s.Vn, ld_h(BV), s.dZ, ld_f(C));            // dZ += dO Vn^T
    tile::gemm<C, BV, C, false, true, false>(s.Tmh, ld_h(C), s.dvn, ld_h(BV), s.dVbf, ld_f(BV));       // dVb = Tm^T dVn
    tile::gemm_frags<C, KP, BV, true, false>(s.dO, ld_h(BV), s.Ht, ld_h(BV), dQg);                      // dO h^T
    tile::gemm_frags<C, KP, BV, true, false>(s.Vn, ld_h(BV), s.dHt, ld_h(BV), dKd);                     // Vn dh^T
    for (int i = threadIdx.x; i < KP * BV; i += blockDim.x) {
      const int r = i / BV, col = i % BV;
      hs_part += tile::to_f(s.Ht[r * ld_h(BV) + col]) * tile::to_f(s.dHt[r * ld_h(BV) + col]);
    }
    __syncthreads();
    {  // dv = beta dVb; dbeta += rowsum(dVb o V); dVbn = -dVb. 4 threads a row, 8 columns each.
      const int r = threadIdx.x / 4, c0 = (threadIdx.x % 4) * 8;
      float part = 0.f, dv8[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float d = s.dVbf[r * ld_f(BV) + c0 + e];
        part += d * tile::to_f(s.Vt[r * ld_h(BV) + c0 + e]);
        dv8[e] = s.beta[r] * d;
        s.dVbn[r * ld_h(BV) + c0 + e] = tile::from_f<T>(-d);
      }
      part += __shfl_xor_sync(0xffffffff, part, 1);
      part += __shfl_xor_sync(0xffffffff, part, 2);
      if (threadIdx.x % 4 == 0) s.dbeta[r] += part;
      T* dst = static_cast<T*>(b.dv) + tv + static_cast<int64_t>(r) * H * V + c0;
      if (r < rows && c0 < cols) {
        if (vec) {
          *reinterpret_cast<uint4*>(dst) = tile::pack8<T>(dv8);
        } else {
          for (int e = 0; e < 8; ++e)
            if (c0 + e < cols) dst[e] = tile::from_f<T>(dv8[e]);
        }
      }
    }
    __syncthreads();
    tile::gemm_frags<C, KP, BV, true, false>(s.dVbn, ld_h(BV), s.Ht, ld_h(BV), dKb);                   // -dVb h^T
    tile::gemm<C, C, BV, true, false, true>(s.dVbn, ld_h(BV), s.Vn, ld_h(BV), s.dA, ld_f(C));          // -dVb Vn^T
    __syncthreads();
  }
  const float hs = block_sum(hs_part, s.red);

  // C x C terms: dQK = tril(dZ) o E;  G = tril_-1(dA) o beta_r E;  gate terms hz = dZ o (Q K^T o E), ha = dA o A.
  tile::gemm<C, C, KP, true, false, false>(s.Qs, ld_h(KP), s.Ks, ld_h(KP), s.P, ld_f(C));              // Q K^T
  if (threadIdx.x < C) s.dgam[threadIdx.x] = 0.f;
  __syncthreads();
  {
    const int r = threadIdx.x / 4, l = threadIdx.x % 4;  // 4 threads a row (row sums) ...
    float row_hz = 0.f, row_ha = 0.f, row_beta = 0.f;
    for (int u = l; u < C; u += 4) {
      const float e = u <= r ? __expf(s.gam[r] - s.gam[u]) : 0.f;
      const float dz = s.dZ[r * ld_f(C) + u], da = u < r ? s.dA[r * ld_f(C) + u] : 0.f;
      const float kke = s.KKE[r * ld_f(C) + u];  // (k_r . k_u) E, zero above the diagonal
      s.dQKh[r * ld_h(C) + u] = tile::from_f<T>(dz * e);
      s.Gh[r * ld_h(C) + u] = tile::from_f<T>(da * s.beta[r] * e);
      row_hz += dz * s.P[r * ld_f(C) + u] * e;
      row_ha += da * s.beta[r] * kke;
      row_beta += da * kke;
    }
    const int u = threadIdx.x / 4;  // ... and the same threads take column sums of column u
    float col_hz = 0.f, col_ha = 0.f;
    for (int r2 = l; r2 < C; r2 += 4) {
      const float e = u <= r2 ? __expf(s.gam[r2] - s.gam[u]) : 0.f;
      col_hz += s.dZ[r2 * ld_f(C) + u] * s.P[r2 * ld_f(C) + u] * e;
      col_ha += (u < r2 ? s.dA[r2 * ld_f(C) + u] : 0.f) * s.beta[r2] * s.KKE[r2 * ld_f(C) + u];
    }
    float x = row_hz - col_hz + row_ha - col_ha;
    x += __shfl_xor_sync(0xffffffff, x, 1);
    x += __shfl_xor_sync(0xffffffff, x, 2);
    row_beta += __shfl_xor_sync(0xffffffff, row_beta, 1);
    row_beta += __shfl_xor_sync(0xffffffff, row_beta, 2);
    if (l == 0) {
      s.dgam[r] += x;
      s.dbeta[r] += row_beta;
    }
  }
  __syncthreads();

  // dq = e^gamma o dQg + dQK K
  tile::store_frags<KP>(s.S1, ld_f(KP), dQg);
  __syncthreads();
  {
    const int r = threadIdx.x / 4, l = threadIdx.x % 4;
    const float eg = __expf(s.gam[r]);
    float part = 0.f;
    for (int col = l; col < KP; col += 4) {
      const float d = s.S1[r * ld_f(KP) + col];
      part += d * tile::to_f(s.Qs[r * ld_h(KP) + col]);
      s.S1[r * ld_f(KP) + col] = d * eg;
    }
    part += __shfl_xor_sync(0xffffffff, part, 1);
    part += __shfl_xor_sync(0xffffffff, part, 2);
    if (l == 0) s.dgam[r] += eg * part;
  }
  __syncthreads();
  tile::gemm<C, KP, C, true, true, true>(s.dQKh, ld_h(C), s.Ks, ld_h(KP), s.S1, ld_f(KP));
  __syncthreads();
  tile::store_tile<C, KP>(static_cast<T*>(b.dq) + (tok0 * H + h) * K, H * K, s.S1, rows, p.K, p.vec_k);
  __syncthreads();  // S1 is reused below

  // dk = e^(gC - gamma) o dKd + beta e^gamma o dKb + dQK^T Q + G K + G^T K
  tile::store_frags<KP>(s.S1, ld_f(KP), dKd);
  tile::store_frags<KP>(s.S2, ld_f(KP), dKb);
  __syncthreads();
  {
    const int r = threadIdx.x / 4, l = threadIdx.x % 4;
    const float kd = __expf(s.gam[C - 1] - s.gam[r]), eg = __expf(s.gam[r]), bg = s.beta[r] * eg;
    float hd = 0.f, kb = 0.f;
    for (int col = l; col < KP; col += 4) {
      const float k = tile::to_f(s.Ks[r * ld_h(KP) + col]);
      const float a = s.S1[r * ld_f(KP) + col], bb = s.S2[r * ld_f(KP) + col];
      hd += a * k;
      kb += bb * k;
      s.S1[r * ld_f(KP) + col] = a * kd + bb * bg;
    }
    hd += __shfl_xor_sync(0xffffffff, hd, 1);
    hd += __shfl_xor_sync(0xffffffff, hd, 2);
    kb += __shfl_xor_sync(0xffffffff, kb, 1);
    kb += __shfl_xor_sync(0xffffffff, kb, 2);
    if (l == 0) {
      s.dgam[r] += bg * kb - kd * hd;
      s.dbeta[r] += eg * kb;
      s.hd[r] = kd * hd;  // summed below into the last row's gradient
    }
  }
  __syncthreads();
  tile::gemm<C, KP, C, false, true, true>(s.dQKh, ld_h(C), s.Qs, ld_h(KP), s.S1, ld_f(KP));   // dQK^T Q
  tile::gemm<C, KP, C, true, true, true>(s.Gh, ld_h(C), s.Ks, ld_h(KP), s.S1, ld_f(KP));      // G K
  tile::gemm<C, KP, C, false, true, true>(s.Gh, ld_h(C), s.Ks, ld_h(KP), s.S1, ld_f(KP));     // G^T K
  __syncthreads();
  tile::store_tile<C, KP>(static_cast<T*>(b.dk) + (tok0 * H + h) * K, H * K, s.S1, rows, p.K, p.vec_k);
  if (threadIdx.x < C && threadIdx.x < rows) b.dbeta[(tok0 + threadIdx.x) * H + h] = s.dbeta[threadIdx.x];
  if (gated && threadIdx.x < 32) {  // dgamma_C += sum hd + e^gC <h, dh>; dg = reverse cumsum of dgamma
    const int lane = threadIdx.x;
    float hd = s.hd[2 * lane] + s.hd[2 * lane + 1];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) hd += __shfl_xor_sync(0xffffffff, hd, o);
    float a = s.dgam[2 * lane], bb = s.dgam[2 * lane + 1];
    if (lane == 31) bb += hd + __expf(s.gam[C - 1]) * hs;
    float x = a + bb;  // suffix sums: scan from the top
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const float y = __shfl_down_sync(0xffffffff, x, off);
      if (lane + off < 32) x += y;
    }
    // x = sum over pairs >= lane of (a + b): rows 2 lane and 2 lane + 1 get x and x - a.
    if (2 * lane < rows) b.dg[(tok0 + 2 * lane) * H + h] = x;
    if (2 * lane + 1 < rows) b.dg[(tok0 + 2 * lane + 1) * H + h] = x - a;
  }
}

}  // namespace linflow::delta_rule
