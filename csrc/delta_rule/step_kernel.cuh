// Delta rule decode step (ALGORITHMS.md §1), per token: S <- a_t S; S <- S + beta_t k_t (v_t - S^T k_t)^T; o_t = s S^T q_t.
// Tiling: block (32-column v-tile, head, batch row) keeps its K x 32 state slab in registers for all T tokens.
// Global: reads the slab once (16-byte loads if V % 4 == 0), q, k, v's 32 columns, beta, g; writes the slab and o once.
#pragma once
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT

#include <cstdint>

#include "common/tile.cuh"
#include "delta_rule/launch.h"

namespace linflow::delta_rule {


namespace step {
constexpr int kThreads = 256;
constexpr int BV = kStepColumns;           // state columns per block
constexpr int kColGroups = BV / 4;         // 4 consecutive columns per thread
constexpr int kRowGroups = kThreads / kColGroups;
constexpr int kWarps = kThreads / 32;
constexpr int TC = 8;                      // tokens staged in shared memory at a time
constexpr int kSums = 9;                   // per column group: S^T k (4), S^T q (4), q . k (1)

// Rows per thread for head dim K (K <= 32 R).
inline constexpr int rows_per_thread(int64_t K) { return K <= 32 ? 1 : K <= 64 ? 2 : K <= 128 ? 4 : 8; }
// Resident blocks per SM asked of the register allocator (64 / 80 registers a thread): enough 16-byte loads in
// flight to keep HBM busy while other blocks reduce.
inline constexpr int min_blocks(int R) { return R <= 4 ? 4 : 3; }

// The state cache row of batch row b: state_indices[b] (int32 / int64; < 0: a padding row), or b itself.
__device__ __forceinline__ int64_t state_row(const StepParams& p, int b) {
  if (p.state_indices == nullptr) return b;
  return p.idx64 ? static_cast<const int64_t*>(p.state_indices)[b * p.idx_stride]
                 : static_cast<const int32_t*>(p.state_indices)[b * p.idx_stride];
}

__device__ __forceinline__ float load_float(const void* p, int64_t i, FloatKind kind) {
  switch (kind) {
    case FloatKind::bf16: return tile::to_f(static_cast<const __nv_bfloat16*>(p)[i]);
    case FloatKind::f16: return tile::to_f(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
}  // namespace step

// Grid: one block per (v-tile, head, batch row), v-tile fastest (neighbouring blocks stream neighbouring state
// memory). Thread (rg, cg) = (tid / 8, tid % 8) holds rows rg + 32 i, columns 4 cg .. 4 cg + 3 of the slab; the
// K-sums S^T k, S^T q are warp shuffles over rg plus a shared-memory pass over warps (two barriers per token; the
// next token's writes to partial / total come after both, so one buffer of each suffices).
// Padding rows (state_indices[b] < 0) leave the state alone and write o = 0.
template <int R, typename T>
__global__ void __launch_bounds__(step::kThreads, step::min_blocks(R)) step_kernel(const StepParams p) {
  using namespace step;
  constexpr int KP = R * kRowGroups;  // padded head dim: rows >= K are zero in registers and in qs / ks
  __shared__ __align__(16) float qs[TC][KP];
  __shared__ __align__(16) float ks[TC][KP];
  __shared__ __align__(16) float vs[TC][BV];
  __shared__ float beta_s[TC], decay_s[TC];
  __shared__ float partial[kWarps][kSums * kColGroups];  // per-warp sums, [e][cg]
  __shared__ float total[kSums * kColGroups];             // block sums, [e][cg]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, cg = tid % kColGroups, rg = tid / kColGroups;
  const int nv = (p.V + BV - 1) / BV;
  const int vt = static_cast<int>(blockIdx.x % nv);
  const int h = static_cast<int>((blockIdx.x / nv) % p.H);
  const int b = static_cast<int>(blockIdx.x / nv / p.H);
  const int c0 = vt * BV;             // first column of the block
  const int col = c0 + cg * 4;        // first of this thread's 4 columns
  const int64_t o_tok = static_cast<int64_t>(p.H) * p.V;
  T* o = static_cast<T*>(p.o) + (static_cast<int64_t>(b) * p.T * p.H + h) * p.V;  // o[b, 0, h, :]

  const int64_t n = step::state_row(p, b);
  if (n < 0) {  // padding slot (block-uniform)
    for (int i = tid; i < p.T * BV; i += kThreads) {
      const int t = i / BV, c = c0 + i % BV;
      if (c < p.V) o[t * o_tok + c] = tile::from_f<T>(0.f);
    }
    return;
  }
  CUDA_KERNEL_ASSERT(n < p.N && "delta_rule_step: state_indices out of range");

  // The slab: S[i][j] = state[n, h, rg + 32 i, col + j]; zero outside K x V. All loads issued before any use.
  float* slab = p.state + ((n * p.H + h) * p.K) * p.V;
  float S[R][4];
  if (p.vec_state) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int r = rg + i * kRowGroups;
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (r < p.K && col < p.V) x = __ldcs(reinterpret_cast<const float4*>(slab + r * p.V + col));
      S[i][0] = x.x, S[i][1] = x.y, S[i][2] = x.z, S[i][3] = x.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int r = rg + i * kRowGroups;
#pragma unroll
      for (int j = 0; j < 4; ++j) S[i][j] = r < p.K && col + j < p.V ? __ldcs(slab + r * p.V + col + j) : 0.f;
    }
  }

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2];
  const int64_t beta_off = b * p.beta_stride[0] + h * p.beta_stride[2];
  const int64_t g_off = b * p.g_stride[0] + h * p.g_stride[2];
#pragma unroll 1
  for (int t0 = 0; t0 < p.T; t0 += TC) {
    const int tc = p.T - t0 < TC ? p.T - t0 : TC;
    if (t0 > 0) __syncthreads();  // the previous chunk's last update still reads ks
#pragma unroll 1
    for (int i = tid; i < tc * KP; i += kThreads) {
      const int tt = i / KP, c = i % KP;
      const int64_t t = t0 + tt;
      const bool ok = c < p.K;
      qs[tt][c] = ok ? tile::to_f(q[t * p.q_stride[1] + c * p.q_stride[3]]) : 0.f;
      ks[tt][c] = ok ? tile::to_f(k[t * p.k_stride[1] + c * p.k_stride[3]]) : 0.f;
    }
#pragma unroll 1
    for (int i = tid; i < tc * BV; i += kThreads) {
      const int tt = i / BV, c = c0 + i % BV;
      vs[tt][i % BV] = c < p.V ? tile::to_f(v[(t0 + tt) * p.v_stride[1] + c * p.v_stride[3]]) : 0.f;
    }
    if (tid < tc) {
      const int64_t t = t0 + tid;
      beta_s[tid] = step::load_float(p.beta, beta_off + t * p.beta_stride[1], p.beta_kind);
      decay_s[tid] = p.g != nullptr ? __expf(step::load_float(p.g, g_off + t * p.g_stride[1], p.g_kind)) : 1.f;
    }
    __syncthreads();

#pragma unroll 1
    for (int tt = 0; tt < tc; ++tt) {
      // Partial sums over this thread's rows, on the undecayed S (the decay multiplies them afterwards).
      float sum[kSums];
#pragma unroll
      for (int e = 0; e < kSums; ++e) sum[e] = 0.f;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const float kr = ks[tt][rg + i * kRowGroups], qr = qs[tt][rg + i * kRowGroups];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          sum[j] = fmaf(S[i][j], kr, sum[j]);
          sum[4 + j] = fmaf(S[i][j], qr, sum[4 + j]);
        }
        sum[8] = fmaf(qr, kr, sum[8]);
      }
      // Lanes with equal cg (lane % 8) share columns: reduce over lane / 8 by shuffles, then over warps in shared
      // memory: threads e * 8 + cg (< 72) each finish one sum, and every thread reads back the 9 of its cg.
#pragma unroll
      for (int e = 0; e < kSums; ++e) {
        sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], 8);
        sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], 16);
      }
      if (lane < kColGroups) {
#pragma unroll
        for (int e = 0; e < kSums; ++e) partial[warp][e * kColGroups + lane] = sum[e];
      }
      __syncthreads();
      if (tid < kSums * kColGroups) {
        float x = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) x += partial[w][tid];
        total[tid] = x;
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < kSums; ++e) sum[e] = total[e * kColGroups + cg];

      // With the decayed state aS: delta = beta (v - aS^T k), o = s (aS + k delta^T)^T q = s (aS^T q + (q.k) delta).
      const float a = decay_s[tt], bt = beta_s[tt];
      float delta[4], out[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        delta[j] = bt * (vs[tt][cg * 4 + j] - a * sum[j]);
        out[j] = p.scale * fmaf(sum[8], delta[j], a * sum[4 + j]);
      }
      if (rg == 0) {
        T* ot = o + (t0 + tt) * o_tok;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (col + j < p.V) ot[col + j] = tile::from_f<T>(out[j]);
      }
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const float kr = ks[tt][rg + i * kRowGroups];
#pragma unroll
        for (int j = 0; j < 4; ++j) S[i][j] = fmaf(a, S[i][j], kr * delta[j]);
      }
    }
  }

  if (p.vec_state) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int r = rg + i * kRowGroups;
      if (r < p.K && col < p.V)
        __stcs(reinterpret_cast<float4*>(slab + r * p.V + col), make_float4(S[i][0], S[i][1], S[i][2], S[i][3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int r = rg + i * kRowGroups;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (r < p.K && col + j < p.V) __stcs(slab + r * p.V + col + j, S[i][j]);
    }
  }
}

}  // namespace linflow::delta_rule
