// Delta rule decode step on CUDA: the launcher of step_kernel (step_kernel.cuh). Template parameters: q's dtype and
// the rows per thread R (head dim K <= 32 R): 12 instantiations. With p.v2 (the default; LINFLOW_STEP_KERNEL=v1
// clears it) the shapes step2::covers runs step_kernel_v2 (step_kernel_v2.cuh): lanes a row LC x rows a thread R,
// 6 pairs x 3 dtypes.
// Checks and the params struct: cuda_host.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "delta_rule/launch.h"
#include "delta_rule/step_kernel.cuh"
#include "delta_rule/step_kernel_v2.cuh"

namespace linflow::delta_rule {
namespace {

// step_kernel_v2: one block per (128- or 64-column tile, head, batch row).
template <typename T>
cudaError_t launch_v2(const StepParams& p, cudaStream_t stream) {
  const int LC = step2::lanes_per_row(p.K, p.V), R = step2::rows_per_thread(p.K, LC);
  const int64_t blocks = static_cast<int64_t>((p.V + 4 * LC - 1) / (4 * LC)) * p.H * p.B;
  auto run = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), step2::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  };
  if (LC == 32) {
    switch (R) {
      case 4: return run(step_kernel_v2<32, 4, T>);
      case 8: return run(step_kernel_v2<32, 8, T>);
      default: return run(step_kernel_v2<32, 16, T>);
    }
  }
  switch (R) {
    case 4: return run(step_kernel_v2<16, 4, T>);
    case 8: return run(step_kernel_v2<16, 8, T>);
    default: return run(step_kernel_v2<16, 16, T>);
  }
}

template <typename T>
cudaError_t launch(const StepParams& p, int64_t blocks, cudaStream_t stream) {
  if (p.v2 && step2::covers(p)) return launch_v2<T>(p, stream);
  auto run = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), step::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  };
  switch (step::rows_per_thread(p.K)) {
    case 1: return run(step_kernel<1, T>);
    case 2: return run(step_kernel<2, T>);
    case 4: return run(step_kernel<4, T>);
    default: return run(step_kernel<8, T>);
  }
}

}  // namespace

cudaError_t launch_step(const StepParams& p, Elem e, int64_t blocks, cudaStream_t s) {
  if (blocks == 0) return cudaSuccess;
  switch (e) {
    case Elem::f32: return launch<float>(p, blocks, s);
    case Elem::bf16: return launch<__nv_bfloat16>(p, blocks, s);
    default: return launch<__half>(p, blocks, s);
  }
}

}  // namespace linflow::delta_rule
