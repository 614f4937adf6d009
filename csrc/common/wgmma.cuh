// Hopper warpgroup tensor-core products (wgmma.mma_async, sm_90a only): a block's warpgroup (4 warps) computes a
// 64 x N product with A from registers and B from shared memory.
//   A (64 x 16 a k-step): warp w holds rows 16 w .. 16 w + 15 in the mma.sync A-fragment layout (mma.cuh), so a
//     mma.sync accumulator pair packed by mma::acc_to_a is a wgmma A operand as it is.
//   D (64 x N fp32):      warp w holds rows 16 w..; d[j][e] is the mma.sync accumulator of the 16 x 8 column tile j.
//   B (16 x N a k-step):  a 16-bit tile in shared memory in the SW128 layout below, read through a descriptor:
//     b_kmajor:  B[k][n] = X[n][k]  (X rows are the output columns: X = W gives S^T W^T)
//     b_mnmajor: B[k][n] = X[k][n]  (X rows are the contraction index: X = K gives Vn^T K)
// SW128 layout of a ROWS x COLS tile X (COLS a multiple of 64): COLS / 64 panels of ROWS x 128 bytes, the 16-byte
// chunk c of row r of a panel at chunk position c ^ (r % 8); the tile starts 1024-byte aligned.
// Ordering: shared memory written by threads (cp.async included) needs fence_proxy_async() in the writing threads
// before the barrier that precedes the wgmma; registers written before a wgmma need fence() first; results are
// ready after commit() + wait<0>().
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/tile.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LINFLOW_HAS_WGMMA 1
#else
#define LINFLOW_HAS_WGMMA 0
#endif

namespace linflow::wgmma {

constexpr int kAlign = 1024;  // SW128 tiles start on this boundary

// Element offset of (r, c) in a ROWS-row SW128 tile of 16-bit elements.
template <int ROWS>
__host__ __device__ constexpr int sw128(int r, int c) {
  return (c / 64) * ROWS * 64 + r * 64 + ((((c % 64) / 8) ^ (r % 8)) * 8) + (c % 8);
}

// cp.async of a ROWS x COLS tile (rows x cols of it valid, the rest zero) into the SW128 layout; NT threads.
// Without `vec` (cols % 8 != 0 or unaligned rows) it stores element by element.
template <int ROWS, int COLS, typename T, int NT>
__device__ __forceinline__ void fetch_tile_sw128(T* dst, const T* src, int64_t row_stride, int rows, int cols,
                                                 bool vec) {
  constexpr int V8 = COLS / 8;
  static_assert(COLS % 64 == 0 && (ROWS * V8) % NT == 0, "whole panels, whole thread steps");
  if constexpr (NT % V8 == 0 && (NT / V8) % 8 == 0 && ROWS % (NT / V8) == 0) {
    if (vec && rows == ROWS && cols == COLS) {  // full tile (block-uniform): a fixed column and swizzle phase a thread
      constexpr int STEP = NT / V8;             // rows a step, a multiple of 8: r % 8 and the chunk's slot stay put
      const int r0 = threadIdx.x / V8, c = (threadIdx.x % V8) * 8;
      const T* s = src + r0 * row_stride + c;
      const int64_t s_step = STEP * row_stride;
      T* d = dst + sw128<ROWS>(r0, c);
#pragma unroll
      for (int k = 0; k < ROWS / STEP; ++k, s += s_step) tile::cp_async16(d + k * STEP * 64, s, true);
      return;
    }
  }
  if (vec) {
#pragma unroll
    for (int j = 0; j < ROWS * V8 / NT; ++j) {
      const int i = threadIdx.x + j * NT, r = i / V8, c = (i % V8) * 8;
      const bool valid = r < rows && c < cols;
      tile::cp_async16(dst + sw128<ROWS>(r, c), valid ? src + r * row_stride + c : src, valid);
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * COLS; i += NT) {
      const int r = i / COLS, c = i % COLS;
      dst[sw128<ROWS>(r, c)] = (r < rows && c < cols) ? src[r * row_stride + c] : tile::from_f<T>(0.f);
    }
  }
}

__device__ __forceinline__ uint64_t descriptor(const void* p, uint32_t lbo, uint32_t sbo) {
  const uint64_t a = (static_cast<uint32_t>(__cvta_generic_to_shared(p)) & 0x3FFFF) >> 4;
  return a | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) | (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) |
         (1ull << 62);  // 128-byte swizzle
}
// k-step s (contraction rows 16 s..) of B[k][n] = X[n][k], X an SW128 tile with ROWS rows.
template <int ROWS, typename T>
__device__ __forceinline__ uint64_t b_kmajor(const T* X, int s) {
  return descriptor(X + sw128<ROWS>(0, 16 * s), 16, 1024);
}
// k-step s of B[k][n] = X[k][n], X an SW128 tile with ROWS rows (N = COLS: panels ROWS * 128 bytes apart).
template <int ROWS, typename T>
__device__ __forceinline__ uint64_t b_mnmajor(const T* X, int s) {
  return descriptor(X + 16 * s * 64, ROWS * 128, 1024);
}

__device__ __forceinline__ void fence() {
#if LINFLOW_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if LINFLOW_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wait() {
#if LINFLOW_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
#if LINFLOW_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Four 8x8 16-bit matrices from registers to shared memory, transposed (sm_90): r[m] holds (row g, cols 2t, 2t+1)
// of matrix m; lane l gives the address of stored row l % 8 (= fragment column) of matrix l / 8.
__device__ __forceinline__ void stmatrix_x4_trans(void* row_addr, const uint32_t (&r)[4]) {
#if LINFLOW_HAS_WGMMA
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row_addr));
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(s), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
#else
  (void)row_addr, (void)r;
  __trap();
#endif
}

// Keeps the compiler from moving reads or writes of d across the surrounding wgmma fence / wait.
template <int N>
__device__ __forceinline__ void fence_operand(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// d (+)= a . B, one k-step (accumulate false: d = a . B); one asm template a shape, the element type (bf16 / f16)
// pasted into the instruction name. Operands: d (N / 2 fp32), a (4), the B descriptor, accumulate, TRANS_B.
#define LINFLOW_WGMMA_M64N64K16(TY)                                                                                \
  asm volatile(                                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." #TY "." #TY " {"                                               \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "                 \
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"                                                 \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                                           \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),                  \
        "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                  \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),                  \
        "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                  \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),                  \
        "+f"(d[7][2]), "+f"(d[7][3])                                                                               \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int>(accumulate)), "n"(TRANS_B))

#define LINFLOW_WGMMA_M64N128K16(TY)                                                                               \
  asm volatile(                                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                                 \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." #TY "." #TY " {"                                              \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "                 \
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "       \
      "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "       \
      "%60, %61, %62, %63"                                                                                         \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                                           \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),                  \
        "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                  \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),                  \
        "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                  \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),                  \
        "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                  \
        "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]),                \
        "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),            \
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]),            \
        "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),            \
        "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int>(accumulate)), "n"(TRANS_B))

template <bool TRANS_B, typename T>
__device__ __forceinline__ void mma_m64n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                           bool accumulate) {
#if LINFLOW_HAS_WGMMA
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    LINFLOW_WGMMA_M64N64K16(bf16);
  } else {
    LINFLOW_WGMMA_M64N64K16(f16);
  }
#else
  (void)d, (void)a, (void)desc_b, (void)accumulate;
  __trap();
#endif
}

template <bool TRANS_B, typename T>
__device__ __forceinline__ void mma_m64n128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b,
                                           bool accumulate) {
#if LINFLOW_HAS_WGMMA
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    LINFLOW_WGMMA_M64N128K16(bf16);
  } else {
    LINFLOW_WGMMA_M64N128K16(f16);
  }
#else
  (void)d, (void)a, (void)desc_b, (void)accumulate;
  __trap();
#endif
}

#undef LINFLOW_WGMMA_M64N64K16
#undef LINFLOW_WGMMA_M64N128K16

}  // namespace linflow::wgmma
