// Tile helpers for chunk kernels: global <-> shared-memory tile moves with zero fill, and a shared-memory GEMM on
// tensor cores (WMMA 16x16x16, bf16/fp16 operands, fp32 accumulation). A block's warps split the 16x16 output tiles.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace linflow::tile {

template <typename T> __device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f(float x) { return __float2half(x); }

// Padded leading dimensions: +8 halves / +4 floats (16 bytes) break shared-memory bank conflicts and keep every
// 16-row WMMA tile 32-byte aligned.
__host__ __device__ constexpr int ld_h(int cols) { return cols + 8; }
__host__ __device__ constexpr int ld_f(int cols) { return cols + 4; }

// Blocks that use these helpers run 256 threads.
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float* f) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = to_f(e[j]);
}
template <typename T>
__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) e[j] = from_f<T>(f[j]);
  return u;
}

// dst[r][c] = sign * scale_r * src[r * row_stride + c] for r < rows, c < cols, else 0; dst is ROWS x COLS
// (ld = ld_h(COLS)); scale may be null (1). With `vec` (cols % 8 == 0, 16-byte aligned rows) every thread issues
// all its 16-byte loads before the first use.
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ src, int64_t row_stride, int rows, int cols,
                                          bool vec, const float* scale = nullptr, bool negate = false) {
  constexpr int LD = ld_h(COLS), V8 = COLS / 8, ITEMS = ROWS * V8, PER = (ITEMS + kThreads - 1) / kThreads;
  if (vec) {
    uint4 buf[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = threadIdx.x + j * kThreads, r = i / V8, c = (i % V8) * 8;
      buf[j] = make_uint4(0, 0, 0, 0);
      if (i < ITEMS && r < rows && c < cols) buf[j] = __ldg(reinterpret_cast<const uint4*>(src + r * row_stride + c));
    }
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = threadIdx.x + j * kThreads, r = i / V8, c = (i % V8) * 8;
      if (i >= ITEMS) break;
      if (scale != nullptr || negate) {
        float f[8];
        unpack8<T>(buf[j], f);
        const float m = (scale ? scale[r] : 1.f) * (negate ? -1.f : 1.f);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] *= m;
        buf[j] = pack8<T>(f);
      }
      *reinterpret_cast<uint4*>(dst + r * LD + c) = buf[j];
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * COLS; i += blockDim.x) {
      const int r = i / COLS, c = i % COLS;
      float x = 0.f;
      if (r < rows && c < cols) {
        x = to_f(src[r * row_stride + c]);
        if (scale) x *= scale[r];
        if (negate) x = -x;
      }
      dst[r * LD + c] = from_f<T>(x);
    }
  }
}

// Asynchronous copy (cp.async, 16 bytes a thread-step, zero fill outside rows x cols) of a ROWS x COLS tile into
// shared memory (ld_h(COLS)); needs cols % 8 == 0 and 16-byte aligned rows, else it loads synchronously.
// Complete with cp_async_wait<n>() + __syncthreads().
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// NT: the block's thread count.
template <int ROWS, int COLS, typename T, int NT = kThreads>
__device__ __forceinline__ void fetch_tile(T* dst, const T* src, int64_t row_stride, int rows, int cols, bool vec) {
  if (!vec) return load_tile<ROWS, COLS>(dst, src, row_stride, rows, cols, false);
  constexpr int LD = ld_h(COLS), V8 = COLS / 8;
  if constexpr (NT % V8 == 0 && ROWS % (NT / V8) == 0) {
    if (rows == ROWS && cols == COLS) {  // full tile (block-uniform): fixed column, pointers step by constant rows
      constexpr int STEP = NT / V8;
      const int r0 = threadIdx.x / V8, c = (threadIdx.x % V8) * 8;
      const T* s = src + r0 * row_stride + c;
      const int64_t s_step = STEP * row_stride;
      T* d = dst + r0 * LD + c;
#pragma unroll
      for (int k = 0; k < ROWS / STEP; ++k, s += s_step) cp_async16(d + k * STEP * LD, s, true);
      return;
    }
  }
  for (int i = threadIdx.x; i < ROWS * V8; i += NT) {
    const int r = i / V8, c = (i % V8) * 8;
    const bool valid = r < rows && c < cols;
    cp_async16(dst + r * LD + c, valid ? src + r * row_stride + c : src, valid);
  }
}

// rows of an fp32 [*, stride] column (e.g. one head of g or beta [B,T,H]) into dst[0..C), zero past `rows`.
template <int ROWS, int NT = kThreads>
__device__ __forceinline__ void fetch_column(float* dst, const float* src, int64_t stride, int rows) {
  for (int r = threadIdx.x; r < ROWS; r += NT) cp_async4(dst + r, r < rows ? src + r * stride : src, r < rows);
}

// Same as load_tile, into an fp32 tile (ld = ld_f(COLS)); src of any element type.
template <int ROWS, int COLS, typename S>
__device__ __forceinline__ void load_tile_f(float* dst, const S* src, int64_t row_stride, int rows, int cols) {
  constexpr int LD = ld_f(COLS);
  for (int i = threadIdx.x; i < ROWS * COLS; i += blockDim.x) {
    const int r = i / COLS, c = i % COLS;
    dst[r * LD + c] = (r < rows && c < cols) ? to_f(src[r * row_stride + c]) : 0.f;
  }
}

// dst[r * row_stride + c] = src[r][c] (fp32 tile, ld_f(COLS)) for r < rows, c < cols; D is the output type.
// With `vec` (D is 2 bytes, cols % 8 == 0, aligned rows): 16-byte stores.
template <int ROWS, int COLS, typename D>
__device__ __forceinline__ void store_tile(D* dst, int64_t row_stride, const float* src, int rows, int cols,
                                           bool vec = false) {
  constexpr int LD = ld_f(COLS);
  if constexpr (sizeof(D) == 2) {
    if (vec) {
      constexpr int V8 = COLS / 8;
      for (int i = threadIdx.x; i < ROWS * V8; i += kThreads) {
        const int r = i / V8, c = (i % V8) * 8;
        if (r < rows && c < cols)
          *reinterpret_cast<uint4*>(dst + r * row_stride + c) = pack8<D>(src + r * LD + c);
      }
      return;
    }
  }
  for (int i = threadIdx.x; i < ROWS * COLS; i += blockDim.x) {
    const int r = i / COLS, c = i % COLS;
    if (r < rows && c < cols) dst[r * row_stride + c] = from_f<D>(src[r * LD + c]);
  }
}

// Half tile copy of an fp32 tile: dst (T, ld_h) = src (fp32, ld_f), 8 elements a thread-step.
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void to_half_tile(T* dst, const float* src) {
  constexpr int V8 = COLS / 8;
  for (int i = threadIdx.x; i < ROWS * V8; i += kThreads) {
    const int r = i / V8, c = (i % V8) * 8;
    *reinterpret_cast<uint4*>(dst + r * ld_h(COLS) + c) = pack8<T>(src + r * ld_f(COLS) + c);
  }
}

// C (fp32, row-major, ldc) = [acc_scale C +] A . B on tensor cores.
//   A is M x KD: row-major A[m * lda + k] if A_ROW, else column-major A[k * lda + m] (i.e. a transposed row-major tile)
//   B is KD x N: row-major B[k * ldb + n] if B_ROW, else column-major B[n * ldb + k]
template <int M, int N, int KD, bool A_ROW, bool B_ROW, bool ACC, typename T>
__device__ __forceinline__ void gemm(const T* A, int lda, const T* B, int ldb, float* C, int ldc, float acc_scale = 1.f) {
  using namespace nvcuda;
  using LA = std::conditional_t<A_ROW, wmma::row_major, wmma::col_major>;
  using LB = std::conditional_t<B_ROW, wmma::row_major, wmma::col_major>;
  static_assert(M % 16 == 0 && N % 16 == 0 && KD % 16 == 0, "tile dims must be multiples of 16");
  constexpr int TN = N / 16;
  const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  for (int t = warp; t < (M / 16) * TN; t += nwarps) {
    const int tm = t / TN, tn = t % TN;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if constexpr (ACC) {  // C <- acc_scale * C + A B
      wmma::load_matrix_sync(acc, C + tm * 16 * ldc + tn * 16, ldc, wmma::mem_row_major);
      if (acc_scale != 1.f)
        for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= acc_scale;
    } else {
      wmma::fill_fragment(acc, 0.f);
    }
#pragma unroll 4
    for (int kk = 0; kk < KD; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
      wmma::load_matrix_sync(a, A_ROW ? A + tm * 16 * lda + kk : A + kk * lda + tm * 16, lda);
      wmma::load_matrix_sync(b, B_ROW ? B + kk * ldb + tn * 16 : B + tn * 16 * ldb + kk, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + tm * 16 * ldc + tn * 16, acc, ldc, wmma::mem_row_major);
  }
}

// Accumulators that stay in registers across a loop: warp w owns output tiles w, w + 8, ... of an M x N product.
using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

template <int NT>
__device__ __forceinline__ void zero_frags(FragAcc (&acc)[NT]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) nvcuda::wmma::fill_fragment(acc[i], 0.f);
}

// acc += A . B (layouts as in gemm) for the warp's own tiles; (M/16)(N/16) == NT * 8.
template <int M, int N, int KD, bool A_ROW, bool B_ROW, int NT, typename T>
__device__ __forceinline__ void gemm_frags(const T* A, int lda, const T* B, int ldb, FragAcc (&acc)[NT]) {
  using namespace nvcuda;
  using LA = std::conditional_t<A_ROW, wmma::row_major, wmma::col_major>;
  using LB = std::conditional_t<B_ROW, wmma::row_major, wmma::col_major>;
  static_assert((M / 16) * (N / 16) == NT * (kThreads / 32), "one tile set per warp");
  constexpr int TN = N / 16;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int t = warp + i * (kThreads / 32), tm = t / TN, tn = t % TN;
#pragma unroll
    for (int kk = 0; kk < KD; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
      wmma::load_matrix_sync(a, A_ROW ? A + tm * 16 * lda + kk : A + kk * lda + tm * 16, lda);
      wmma::load_matrix_sync(b, B_ROW ? B + kk * ldb + tn * 16 : B + tn * 16 * ldb + kk, ldb);
      wmma::mma_sync(acc[i], a, b, acc[i]);
    }
  }
}

template <int N, int NT>
__device__ __forceinline__ void store_frags(float* C, int ldc, const FragAcc (&acc)[NT]) {
  constexpr int TN = N / 16;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int t = warp + i * (kThreads / 32), tm = t / TN, tn = t % TN;
    nvcuda::wmma::store_matrix_sync(C + tm * 16 * ldc + tn * 16, acc[i], ldc, nvcuda::wmma::mem_row_major);
  }
}

}  // namespace linflow::tile
