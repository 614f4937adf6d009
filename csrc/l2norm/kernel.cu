// Row L2 norm on CUDA: one warp a row (8 rows a 256-thread block), the row held in registers (d <= 256: lane l
// owns elements l, l + 32, ...), fp32 sums reduced by shuffles. Memory-bound: one read of x (and dy), one write.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/tile.cuh"
#include "l2norm/launch.h"

namespace linflow::l2norm {
namespace {

constexpr int kRowsPerBlock = 8, kPer = kMaxDim / 32;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(256) fwd_kernel(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ rstd,
                                                  int64_t rows, int d, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* xr = x + row * d;
  float v[kPer], ss = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = lane + 32 * i;
    v[i] = c < d ? tile::to_f(xr[c]) : 0.f;
    ss += v[i] * v[i];
  }
  const float r = rsqrtf(warp_sum(ss) + eps);
  T* yr = y + row * d;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = lane + 32 * i;
    if (c < d) yr[c] = tile::from_f<T>(v[i] * r);
  }
  if (lane == 0) rstd[row] = r;
}

template <typename T>
__global__ void __launch_bounds__(256) bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                  const float* __restrict__ rstd, T* __restrict__ dx, int64_t rows,
                                                  int d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const float r = rstd[row];
  float yv[kPer], g[kPer], dot = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = lane + 32 * i;
    yv[i] = c < d ? tile::to_f(x[row * d + c]) * r : 0.f;
    g[i] = c < d ? tile::to_f(dy[row * d + c]) : 0.f;
    dot += yv[i] * g[i];
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = lane + 32 * i;
    if (c < d) dx[row * d + c] = tile::from_f<T>(r * (g[i] - yv[i] * dot));
  }
}

template <typename T>
cudaError_t fwd_typed(const void* x, void* y, float* rstd, int64_t rows, int d, float eps, cudaStream_t s) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks == 0) return cudaSuccess;
  fwd_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, s>>>(static_cast<const T*>(x), static_cast<T*>(y), rstd,
                                                              rows, d, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* dy, const void* x, const float* rstd, void* dx, int64_t rows, int d,
                      cudaStream_t s) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks == 0) return cudaSuccess;
  bwd_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, s>>>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                              rstd, static_cast<T*>(dx), rows, d);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fwd(const void* x, void* y, float* rstd, int64_t rows, int d, float eps, Elem e, cudaStream_t s) {
  switch (e) {
    case Elem::bf16: return fwd_typed<__nv_bfloat16>(x, y, rstd, rows, d, eps, s);
    case Elem::f16: return fwd_typed<__half>(x, y, rstd, rows, d, eps, s);
    default: return fwd_typed<float>(x, y, rstd, rows, d, eps, s);
  }
}

cudaError_t launch_bwd(const void* dy, const void* x, const float* rstd, void* dx, int64_t rows, int d, Elem e,
                       cudaStream_t s) {
  switch (e) {
    case Elem::bf16: return bwd_typed<__nv_bfloat16>(dy, x, rstd, dx, rows, d, s);
    case Elem::f16: return bwd_typed<__half>(dy, x, rstd, dx, rows, d, s);
    default: return bwd_typed<float>(dy, x, rstd, dx, rows, d, s);
  }
}

}  // namespace linflow::l2norm
