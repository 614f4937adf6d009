// Delta rule decode step, variant v2 (the default where it applies; LINFLOW_STEP_KERNEL=v1 forces step_kernel).
// Same math as step_kernel.cuh, per token: S <- a_t S; S <- S + beta_t k_t (v_t - S^T k_t)^T; o_t = s S^T q_t.
// Tiling, aimed at DRAM locality and fewer barriers: a block of 256 threads owns a K x BV slab, BV = 4 LC columns,
// LC = 32 lanes a row (BV = 128: a warp's 16-byte loads cover 512 contiguous bytes of one state row; with V = 128
// the block's slab is the whole contiguous [K, V] head) or LC = 16 (BV = 64, two rows a warp load) where K > 128
// or V <= 64. Row group g = tid / LC holds rows g R .. g R + R - 1 (R = 4, 8, 16), columns 4 (tid % LC) + 0..3, all
// R 16-byte loads issued before any use. q, k rows are staged per warp (each warp reads only its own rows:
// __syncwarp, no block barrier); v, beta, g are read per thread from global (L1 / L2 hits). The K-sums S^T k, S^T q,
// q . k: in-thread over R rows, shuffles over the warp's row groups (LC = 16), then ONE __syncthreads per token:
// every warp posts its partials to shared memory (double-buffered by token parity) and every thread adds up the 8
// warps' partials of its own columns itself (no second barrier).
// Covers: vec_state (V % 4 == 0, 16-byte aligned state) and V > 32 (any K <= 256). The rest (V % 4 != 0, an
// unaligned state, V <= 32) runs step_kernel (step_cuda.cu falls back).
#pragma once
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT

#include <cstdint>

#include "common/tile.cuh"
#include "delta_rule/launch.h"
#include "delta_rule/step_kernel.cuh"  // step::load_float, step::state_row

namespace linflow::delta_rule {

namespace step2 {
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int TC = 8;  // tokens of q, k staged in shared memory at a time

inline bool covers(const StepParams& p) { return p.vec_state && p.V > 32 && p.K <= 256; }
// Lanes a state row: 32 (128 columns a block) unless K > 128 (registers) or V <= 64 (idle lanes).
inline int lanes_per_row(int K, int V) { return V > 64 && K <= 128 ? 32 : 16; }
// Rows a thread (4, 8 or 16): R * (kThreads / LC) >= K.
inline int rows_per_thread(int K, int LC) {
  const int pass = kThreads / LC, need = (K + pass - 1) / pass;
  return need <= 4 ? 4 : need <= 8 ? 8 : 16;
}
}  // namespace step2

// Grid: one block per (v-tile, head, batch row), v-tile fastest. Padding rows (state_indices[b] < 0): o = 0, the
// state is untouched.
template <int LC, int R, typename T>
__global__ void __launch_bounds__(step2::kThreads, 2) step_kernel_v2(const StepParams p) {
  using namespace step2;
  constexpr int BV = 4 * LC;                // state columns a block
  constexpr int KP = kThreads / LC * R;     // padded head dim: rows >= K are zero in registers and in qs / ks
  constexpr int WR = 32 / LC * R;           // rows of one warp: [warp WR, warp WR + WR)
  static_assert(R % 4 == 0 && (LC == 16 || LC == 32), "float4 reads of qs / ks; the shuffles below");
  __shared__ __align__(16) float qs[TC][KP];
  __shared__ __align__(16) float ks[TC][KP];
  __shared__ float4 red[2][kWarps][2][32];  // [token parity][warp][S^T k | S^T q][lane]: 4 columns each
  __shared__ float red_qk[2][kWarps];        // [token parity][warp]: q . k over the warp's rows

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, lc = tid % LC, r0 = tid / LC * R;
  const int nv = (p.V + BV - 1) / BV;
  const int vt = static_cast<int>(blockIdx.x % nv);
  const int h = static_cast<int>((blockIdx.x / nv) % p.H);
  const int b = static_cast<int>(blockIdx.x / nv / p.H);
  const int c0 = vt * BV;
  const int col = c0 + lc * 4;      // first of this thread's 4 columns; col < V => col + 3 < V (V % 4 == 0)
  const bool has_col = col < p.V;
  const int64_t o_tok = static_cast<int64_t>(p.H) * p.V;
  T* o = static_cast<T*>(p.o) + (static_cast<int64_t>(b) * p.T * p.H + h) * p.V;  // o[b, 0, h, :]

  const int64_t n = step::state_row(p, b);
  if (n < 0) {  // padding slot (block-uniform)
    for (int64_t i = tid; i < static_cast<int64_t>(p.T) * BV; i += kThreads) {
      const int64_t t = i / BV;
      const int c = c0 + static_cast<int>(i % BV);
      if (c < p.V) o[t * o_tok + c] = tile::from_f<T>(0.f);
    }
    return;
  }
  CUDA_KERNEL_ASSERT(n < p.N && "delta_rule_step: state_indices out of range");

  // S[i] = state[n, h, r0 + i, col .. col + 3]; zero outside K x V. Streaming (evict-first) loads, all up-front.
  float* slab = p.state + ((n * p.H + h) * p.K) * p.V;
  float4 S[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    S[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r0 + i < p.K && has_col) S[i] = __ldcs(reinterpret_cast<const float4*>(slab + (r0 + i) * p.V + col));
  }

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[2] + col * p.v_stride[3];
  const int64_t beta_off = b * p.beta_stride[0] + h * p.beta_stride[2];
  const int64_t g_off = b * p.g_stride[0] + h * p.g_stride[2];
  const int wr0 = warp * WR;
#pragma unroll 1
  for (int t0 = 0; t0 < p.T; t0 += TC) {
    const int tc = p.T - t0 < TC ? p.T - t0 : TC;
    __syncwarp();  // this warp's lanes are done with the previous chunk's rows
#pragma unroll 1
    for (int i = lane; i < tc * WR; i += 32) {
      const int tt = i / WR, r = wr0 + i % WR;
      const int64_t t = t0 + tt;
      const bool ok = r < p.K;
      qs[tt][r] = ok ? tile::to_f(q[t * p.q_stride[1] + r * p.q_stride[3]]) : 0.f;
      ks[tt][r] = ok ? tile::to_f(k[t * p.k_stride[1] + r * p.k_stride[3]]) : 0.f;
    }
    __syncwarp();

#pragma unroll 1
    for (int tt = 0; tt < tc; ++tt) {
      const int64_t t = t0 + tt;
      const int buf = static_cast<int>(t & 1);
      // Needed after the barrier: issued now.
      float vv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) vv[j] = has_col ? tile::to_f(v[t * p.v_stride[1] + j * p.v_stride[3]]) : 0.f;
      const float bt = step::load_float(p.beta, beta_off + t * p.beta_stride[1], p.beta_kind);
      const float a =
          p.g != nullptr ? __expf(step::load_float(p.g, g_off + t * p.g_stride[1], p.g_kind)) : 1.f;

      // Partial sums over this thread's rows, on the undecayed S (the decay multiplies them afterwards).
      float sk[4] = {0.f, 0.f, 0.f, 0.f}, sq[4] = {0.f, 0.f, 0.f, 0.f}, qk = 0.f;
#pragma unroll
      for (int i4 = 0; i4 < R; i4 += 4) {
        const float4 k4 = *reinterpret_cast<const float4*>(&ks[tt][r0 + i4]);
        const float4 q4 = *reinterpret_cast<const float4*>(&qs[tt][r0 + i4]);
        const float kr[4] = {k4.x, k4.y, k4.z, k4.w}, qr[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          const float s[4] = {S[i4 + ii].x, S[i4 + ii].y, S[i4 + ii].z, S[i4 + ii].w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            sk[j] = fmaf(s[j], kr[ii], sk[j]);
            sq[j] = fmaf(s[j], qr[ii], sq[j]);
          }
          qk = fmaf(qr[ii], kr[ii], qk);
        }
      }
      // Row groups sharing a warp (LC = 16: lanes l, l ^ 16) hold the same columns.
#pragma unroll
      for (int m = LC; m < 32; m *= 2) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          sk[j] += __shfl_xor_sync(0xffffffffu, sk[j], m);
          sq[j] += __shfl_xor_sync(0xffffffffu, sq[j], m);
        }
        qk += __shfl_xor_sync(0xffffffffu, qk, m);
      }
      // red[buf] was last read for token t - 2, before every thread passed token t - 1's barrier.
      if (lane < LC) {
        red[buf][warp][0][lane] = make_float4(sk[0], sk[1], sk[2], sk[3]);
        red[buf][warp][1][lane] = make_float4(sq[0], sq[1], sq[2], sq[3]);
      }
      if (lane == 0) red_qk[buf][warp] = qk;
      __syncthreads();
      float4 tk = make_float4(0.f, 0.f, 0.f, 0.f), tq = tk;
      float tqk = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float4 x = red[buf][w][0][lc], y = red[buf][w][1][lc];
        tk.x += x.x, tk.y += x.y, tk.z += x.z, tk.w += x.w;
        tq.x += y.x, tq.y += y.y, tq.z += y.z, tq.w += y.w;
        tqk += red_qk[buf][w];
      }

      // With the decayed state aS: delta = beta (v - aS^T k), o = s (aS + k delta^T)^T q = s (aS^T q + (q.k) delta).
      const float stk[4] = {tk.x, tk.y, tk.z, tk.w}, stq[4] = {tq.x, tq.y, tq.z, tq.w};
      float delta[4], out[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        delta[j] = bt * (vv[j] - a * stk[j]);
        out[j] = p.scale * fmaf(tqk, delta[j], a * stq[j]);
      }
      if (tid < LC && has_col) {  // row group 0 writes o
        T* ot = o + t * o_tok + col;
#pragma unroll
        for (int j = 0; j < 4; ++j) ot[j] = tile::from_f<T>(out[j]);
      }
#pragma unroll
      for (int i4 = 0; i4 < R; i4 += 4) {
        const float4 k4 = *reinterpret_cast<const float4*>(&ks[tt][r0 + i4]);
        const float kr[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          float4& s = S[i4 + ii];
          s.x = fmaf(a, s.x, kr[ii] * delta[0]);
          s.y = fmaf(a, s.y, kr[ii] * delta[1]);
          s.z = fmaf(a, s.z, kr[ii] * delta[2]);
          s.w = fmaf(a, s.w, kr[ii] * delta[3]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < R; ++i)
    if (r0 + i < p.K && has_col) __stcs(reinterpret_cast<float4*>(slab + (r0 + i) * p.V + col), S[i]);
}

}  // namespace linflow::delta_rule
