// Delta rule decode step on CUDA: the launcher of step_kernel (step_kernel.cuh). Template parameters: q's dtype and
// the rows per thread R (head dim K <= 32 R): 12 instantiations. Checks and the params struct: cuda_host.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "delta_rule/launch.h"
#include "delta_rule/step_kernel.cuh"

namespace linflow::delta_rule {
namespace {

template <typename T>
cudaError_t launch(const StepParams& p, int64_t blocks, cudaStream_t stream) {
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
