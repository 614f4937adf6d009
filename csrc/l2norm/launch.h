// Row L2 norm CUDA launchers (kernel.cu); plain parameters, the CUDA status back to the host code.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace linflow::l2norm {

constexpr int kMaxDim = 256;  // the kernel keeps a row in registers: 8 elements a lane

enum class Elem : int { f32, bf16, f16 };

// y = x r, rstd = r for `rows` contiguous rows of length d (<= kMaxDim).
cudaError_t launch_fwd(const void* x, void* y, float* rstd, int64_t rows, int d, float eps, Elem e, cudaStream_t s);
// dx = r (dy - y sum(dy y)), y = x r.
cudaError_t launch_bwd(const void* dy, const void* x, const float* rstd, void* dx, int64_t rows, int d, Elem e,
                       cudaStream_t s);

}  // namespace linflow::l2norm
