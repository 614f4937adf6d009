// Chunk machinery shared by every chunked family (delta rule, flow): where a chunk lives in a (possibly packed)
// batch, the within-chunk cumulative log decay, and the WY / UT-transform inverse Tm = (I + A)^-1 with
//   A[r,u] = beta_r (k_r . k_u) exp(gamma_r - gamma_u) for u < r   (ALGORITHMS.md §1).
#pragma once
#include <cstdint>

#include "common/seq_layout.h"
#include "common/tile.cuh"

namespace linflow::chunk {

// gamma[r] = sum_{u <= r} src[u] over the chunk's valid rows (rows past the end repeat the last value, as if g = 0).
// Warp 0 scans (two values a lane, shuffles); src may be shared or global memory, with a row stride.
template <typename G>
__device__ __forceinline__ void cumsum_rows(float* gam, const G* src, int64_t stride, int rows) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  const float a = (src && 2 * lane < rows) ? tile::to_f(src[2 * lane * stride]) : 0.f;
  const float b = (src && 2 * lane + 1 < rows) ? tile::to_f(src[(2 * lane + 1) * stride]) : 0.f;
  float x = a + b;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float y = __shfl_up_sync(0xffffffff, x, off);
    if (lane >= off) x += y;
  }
  gam[2 * lane] = x - b;
  gam[2 * lane + 1] = x;
}

template <typename G>
__device__ __forceinline__ void load_gamma(float* gam, const G* g, int64_t stride, int rows) {
  cumsum_rows(gam, g, stride, rows);
}

// The decayed causal scores of a chunk: Ph[r][u] = scale P[r][u] exp(gamma_r - gamma_u) for u <= r, else 0
// (P fp32 ld_f(C), Ph half ld_h(C)).
template <typename T>
__device__ __forceinline__ void causal_decayed_scores(T* Ph, const float* P, const float* gam, float scale) {
  for (int i = threadIdx.x; i < C * C; i += blockDim.x) {
    const int r = i / C, u = i % C;
    Ph[r * tile::ld_h(C) + u] =
        tile::from_f<T>(u <= r ? scale * P[r * tile::ld_f(C) + u] * __expf(gam[r] - gam[u]) : 0.f);
  }
}

// X[r][:] *= row_scale(r) in place, for a C x KP half tile.
template <int KP, typename T, typename F>
__device__ __forceinline__ void scale_rows(T* X, F&& row_scale) {
  for (int i = threadIdx.x; i < C * KP; i += blockDim.x) {
    const int r = i / KP, col = i % KP;
    X[r * tile::ld_h(KP) + col] = tile::from_f<T>(tile::to_f(X[r * tile::ld_h(KP) + col]) * row_scale(r));
  }
}

template <typename B>
__device__ __forceinline__ void load_rows(float* dst, const B* src, int64_t stride, int rows) {
  for (int r = threadIdx.x; r < C; r += blockDim.x) dst[r] = r < rows ? tile::to_f(src[r * stride]) : 0.f;
}

// Forward substitution for Tm = (I + A)^-1, A[r][u] = beta_r KKE[r][u] (u < r), from KKE = (K K^T) o E (fp32,
// ld_f(C)): Tm[r][j] = -beta_r sum_{u<r} KKE[r][u] Tm[u][j] (r > j). A column of Tm depends only on the same column
// of earlier rows: 4 lanes own column j = tid / 4; lane l keeps rows 16 m + 4 l + e in t[4 m + e] (wy_row), so a
// step reads row r of KKE as one 16-byte piece a lane and group m (the four lanes' pieces are one 64-byte run: no
// bank conflict), groups past r skipped at compile time. KKE must be zero above the diagonal (its diagonal is not
// read: at step r every t row >= r of a column j < r is still 0, so whole groups are summed unmasked).
// Requires blockDim.x == 256.
__device__ __forceinline__ int wy_row(int i) { return 16 * (i / 4) + 4 * (threadIdx.x % 4) + i % 4; }

__device__ __forceinline__ void wy_substitute(const float* KKE, const float* beta, float (&t)[C / 4]) {
  constexpr int LD = tile::ld_f(C);
  static_assert(C == 64 && LD % 4 == 0, "four groups of 16 rows; 16-byte aligned KKE rows");
  const int j = threadIdx.x / 4, l = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < C / 4; ++i) t[i] = (wy_row(i) == j) ? 1.f : 0.f;
#pragma unroll
  for (int r = 1; r < C; ++r) {
    const float* a = KKE + r * LD + 4 * l;
    float part[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      part[m] = 0.f;
      if (16 * m < r) {
        const float4 x = *reinterpret_cast<const float4*>(a + 16 * m);
        part[m] = x.x * t[4 * m] + x.y * t[4 * m + 1] + x.z * t[4 * m + 2] + x.w * t[4 * m + 3];
      }
    }
    float sum = (part[0] + part[1]) + (part[2] + part[3]);
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    if (r > j && l == (r % 16) / 4) t[4 * (r / 16) + r % 4] = -beta[r] * sum;
  }
}

// From Ks (the chunk's keys, C x KP half tile) and beta, gamma: KKE = (K K^T) o E on r >= u (fp32, ld_f(C)), and
// Tm = (I + A)^-1 (fp32, ld_f(C)) by wy_substitute. Requires blockDim.x == 256. Ends with a block barrier.
template <int KP, typename T>
__device__ void wy_inverse(const T* Ks, const float* beta, const float* gam, float* KKE, float* Tm) {
  constexpr int LD = tile::ld_f(C);
  tile::gemm<C, C, KP, true, false, false>(Ks, tile::ld_h(KP), Ks, tile::ld_h(KP), KKE, LD);
  __syncthreads();
  for (int i = threadIdx.x; i < C * C; i += blockDim.x) {
    const int r = i / C, u = i % C;
    KKE[r * LD + u] = u <= r ? KKE[r * LD + u] * __expf(gam[r] - gam[u]) : 0.f;
  }
  __syncthreads();
  float t[C / 4];
  wy_substitute(KKE, beta, t);
  const int j = threadIdx.x / 4;
#pragma unroll
  for (int i = 0; i < C / 4; ++i) Tm[wy_row(i) * LD + j] = t[i];
  __syncthreads();
}

// Inclusive prefix sums of the chunk's C log gates (shared memory, zero past the chunk), scanned by each warp:
// lane L keeps x = gamma(2L + 1) and b = g(2L + 1), so gamma(2L) = x - b.
struct WarpGamma {
  float x = 0.f, b = 0.f;
  __device__ __forceinline__ void scan(const float* g) {
    const int lane = threadIdx.x % 32;
    const float a = g[2 * lane];
    b = g[2 * lane + 1];
    x = a + b;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const float y = __shfl_up_sync(0xffffffff, x, off);
      if (lane >= off) x += y;
    }
  }
  __device__ __forceinline__ float at(int r) const {  // all lanes must call
    const float xs = __shfl_sync(0xffffffff, x, r / 2), bs = __shfl_sync(0xffffffff, b, r / 2);
    return (r & 1) ? xs : xs - bs;
  }
  __device__ __forceinline__ float last() const { return __shfl_sync(0xffffffff, x, 31); }
};

}  // namespace linflow::chunk
