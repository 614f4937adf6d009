// One kernel launch with a dynamic shared-memory size: raises the kernel's limit to `smem` (needed above 48 KB),
// launches, and returns the launch error. An empty grid launches nothing.
#pragma once
#include <cuda_runtime.h>

namespace linflow {

template <typename Kernel, typename Params>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, size_t smem, const Params& p, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linflow
