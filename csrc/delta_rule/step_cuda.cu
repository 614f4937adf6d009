// Delta rule decode step on CUDA: the launcher of step_kernel (step_kernel.cuh). Template parameters: q's dtype and
// the block shape (rows a thread R, threads NT; step::shape_for): 21 instantiations. Checks and the params struct: cuda_host.cpp.
#include <cstdlib>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "delta_rule/launch.h"
#include "delta_rule/step_kernel.cuh"

namespace linflow::delta_rule {
namespace {

// LINFLOW_STEP_THREADS=256: the earlier 256-thread block shape for every head dim (A/B measurements). Read once.
bool wide_blocks() {
  static const bool w = [] {
    const char* e = std::getenv("LINFLOW_STEP_THREADS");
    return e != nullptr && std::atoi(e) == 256;
  }();
  return w;
}

template <typename T>
cudaError_t launch(const StepParams& p, int64_t blocks, cudaStream_t stream) {
  auto run = [&](auto kernel, int threads) {
    kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
    return cudaGetLastError();
  };
  const step::Shape sh = step::shape_for(p.K, wide_blocks());
  if (sh.NT == 256) {
    switch (sh.R) {
      case 1: return run(step_kernel<1, 256, T>, 256);
      case 2: return run(step_kernel<2, 256, T>, 256);
      case 4: return run(step_kernel<4, 256, T>, 256);
      default: return run(step_kernel<8, 256, T>, 256);
    }
  }
  switch (sh.R) {
    case 2: return run(step_kernel<2, 128, T>, 128);
    case 4: return run(step_kernel<4, 128, T>, 128);
    default: return run(step_kernel<8, 128, T>, 128);
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
