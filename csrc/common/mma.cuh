// Warp-level tensor-core primitives (sm_80+): mma.sync m16n8k16 (bf16/fp16 operands, fp32 accumulators) and
// ldmatrix. Fragment layouts (lane = 4 g + t):
//   accumulator c[4] of a 16x8 tile:  c0,c1 = (row g,   cols 2t, 2t+1)   c2,c3 = (row g+8, cols 2t, 2t+1)
//   A fragment a[4] of a 16x16 tile:  a0 = (g, 2t..)  a1 = (g+8, 2t..)  a2 = (g, 2t+8..)  a3 = (g+8, 2t+8..)
//   B fragment b[2] of a 16x8 tile:   b0 = (rows 2t, 2t+1; col g)       b1 = (rows 2t+8, 2t+9; col g)
// Two accumulator tiles side by side (cols 0-7, 8-15) are exactly one A fragment once packed to 16 bits: a product
// kept in registers feeds the next product without touching shared memory (acc_to_a).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace linflow::mma {

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  } else {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
}

// c += a . b  (16x16 by 16x8)
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Four 8x8 16-bit matrices; lane l gives the address of row l % 8 of matrix l / 8 (16-byte aligned). Result r[m]
// holds, of matrix m, (row g, cols 2t, 2t+1), or with TRANS (rows 2t, 2t+1, col g).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row_addr));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  }
}

// B fragments of two adjacent 8-column tiles (n0, n0 + 8) for the k-block k0..k0+15, from a row-major tile X
// (ld elements) in shared memory:
//   b_from_rows:  B[k][n] = X[n][k]  (X rows are the output columns, e.g. B = W^T with W row-major)
//   b_from_cols:  B[k][n] = X[k][n]  (X rows are the contraction index, e.g. B = K with K row-major)
// Result: {b0, b1} of tile n0 in r[0], r[1]; of tile n0 + 8 in r[2], r[3].
template <typename T>
__device__ __forceinline__ void b_from_rows(uint32_t (&r)[4], const T* X, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32, mi = lane / 8;
  ldmatrix_x4<false>(r, X + (n0 + lane % 8 + 8 * (mi / 2)) * ld + k0 + 8 * (mi % 2));
}
template <typename T>
__device__ __forceinline__ void b_from_cols(uint32_t (&r)[4], const T* X, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32, mi = lane / 8;
  ldmatrix_x4<true>(r, X + (k0 + lane % 8 + 8 * (mi % 2)) * ld + n0 + 8 * (mi / 2));
}
// A fragment of the 16x16 tile (m0.., k0..) of A = X^T, X row-major [k][m] in shared memory.
template <typename T>
__device__ __forceinline__ void a_from_cols(uint32_t (&r)[4], const T* X, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32, mi = lane / 8;
  ldmatrix_x4<true>(r, X + (k0 + lane % 8 + 8 * (mi / 2)) * ld + m0 + 8 * (mi % 2));
}
// A fragment of the 16x16 tile (m0.., k0..) of a row-major X [m][k] in shared memory.
template <typename T>
__device__ __forceinline__ void a_from_rows(uint32_t (&r)[4], const T* X, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32, mi = lane / 8;
  ldmatrix_x4<false>(r, X + (m0 + lane % 8 + 8 * (mi % 2)) * ld + k0 + 8 * (mi / 2));
}

// B fragments of the tiles n0, n0 + 8 (k-block k0..) from a row-major shared tile X: B_ROWS: B[k][n] = X[n][k]
// (b_from_rows), else B[k][n] = X[k][n] (b_from_cols).
template <bool B_ROWS, typename T>
__device__ __forceinline__ void b_pair(uint32_t (&r)[4], const T* X, int ld, int n0, int k0) {
  if constexpr (B_ROWS) {
    b_from_rows(r, X, ld, n0, k0);
  } else {
    b_from_cols(r, X, ld, n0, k0);
  }
}

// acc[j] (16 x 8 tiles, columns n0 + 8 j, j < NJ) += sum over kb < KB of a[kb] . B(k0 + 16 kb ..), with B's blocks
// read from a row-major shared tile X (ld elements) as b_pair<B_ROWS>.
// Per accumulator the k-blocks are summed in ascending order.
template <bool B_ROWS, int NJ, int KB, typename T>
__device__ __forceinline__ void mma_acc(float (&acc)[NJ][4], const uint32_t (&a)[KB][4], const T* X, int ld,
                                        int n0 = 0, int k0 = 0) {
  static_assert(NJ % 2 == 0, "tiles go in pairs");
#pragma unroll
  for (int j = 0; j < NJ; j += 2)
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
      uint32_t b[4];
      b_pair<B_ROWS>(b, X, ld, n0 + 8 * j, k0 + 16 * kb);
      mma16816<T>(acc[j], a[kb], b[0], b[1]);
      mma16816<T>(acc[j + 1], a[kb], b[2], b[3]);
    }
}

// acc0 += a0 . B and acc1 += a1 . B with B's fragments loaded once (layouts as mma_acc).
template <bool B_ROWS, int NJ, int KB, typename T>
__device__ __forceinline__ void mma_acc2(float (&acc0)[NJ][4], const uint32_t (&a0)[KB][4], float (&acc1)[NJ][4],
                                         const uint32_t (&a1)[KB][4], const T* X, int ld, int n0 = 0, int k0 = 0) {
  static_assert(NJ % 2 == 0, "tiles go in pairs");
#pragma unroll
  for (int j = 0; j < NJ; j += 2)
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
      uint32_t bf[4];
      b_pair<B_ROWS>(bf, X, ld, n0 + 8 * j, k0 + 16 * kb);
      mma16816<T>(acc0[j], a0[kb], bf[0], bf[1]);
      mma16816<T>(acc0[j + 1], a0[kb], bf[2], bf[3]);
      mma16816<T>(acc1[j], a1[kb], bf[0], bf[1]);
      mma16816<T>(acc1[j + 1], a1[kb], bf[2], bf[3]);
    }
}

// acc (16 rows m0.. x NJ 8-column tiles from n0) += A[m0.., 0..16 KB) . B, A a row-major shared tile read a
// k-block at a time, B's blocks from the row-major shared tile X as b_pair<B_ROWS> (B_ROWS: B = X^T).
template <bool B_ROWS, int KB, int NJ, typename T>
__device__ __forceinline__ void mma_rows(float (&acc)[NJ][4], const T* A, int lda, int m0, const T* X, int ldx,
                                         int n0) {
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) {
    uint32_t a[1][4];
    a_from_rows(a[0], A, lda, m0, 16 * kb);
    mma_acc<B_ROWS>(acc, a, X, ldx, n0, 16 * kb);
  }
}

template <int NJ>
__device__ __forceinline__ void zero_acc(float (&acc)[NJ][4]) {
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// A fragment for k-block kb from accumulator tiles acc[2 kb], acc[2 kb + 1] (16 x 8 each), columns scaled by
// col_scale[2 kb][e] (e: the column pair 2t, 2t+1 of the tile).
template <typename T, int N>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[N][4], int kb) {
  a[0] = pack2<T>(acc[2 * kb][0], acc[2 * kb][1]);
  a[1] = pack2<T>(acc[2 * kb][2], acc[2 * kb][3]);
  a[2] = pack2<T>(acc[2 * kb + 1][0], acc[2 * kb + 1][1]);
  a[3] = pack2<T>(acc[2 * kb + 1][2], acc[2 * kb + 1][3]);
}
template <typename T, int N>
__device__ __forceinline__ void acc_to_a_scaled(uint32_t (&a)[4], const float (&acc)[N][4], const float (&cs)[N][2],
                                                int kb, float sign = 1.f) {
  const int j0 = 2 * kb, j1 = 2 * kb + 1;
  a[0] = pack2<T>(sign * acc[j0][0] * cs[j0][0], sign * acc[j0][1] * cs[j0][1]);
  a[1] = pack2<T>(sign * acc[j0][2] * cs[j0][0], sign * acc[j0][3] * cs[j0][1]);
  a[2] = pack2<T>(sign * acc[j1][0] * cs[j1][0], sign * acc[j1][1] * cs[j1][1]);
  a[3] = pack2<T>(sign * acc[j1][2] * cs[j1][0], sign * acc[j1][3] * cs[j1][1]);
}

}  // namespace linflow::mma
