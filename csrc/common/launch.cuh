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

// Two streams serving one op: work queued on `side` after the fork runs after everything queued on `main` before
// it; `main` waits for all of `side`'s work at join() (or destruction, which joins even after an error, so a CUDA
// graph capture stays a closed fork/join). handoff(from, to): `to` waits for what `from` has queued so far.
// side == main (or null) is plain in-order launching on one stream. Events are created per handoff and released at
// once (the runtime keeps a recorded event alive until it completes), so nothing outlives the op.
class StreamFork {
 public:
  StreamFork(cudaStream_t main, cudaStream_t side) : main_(main), side_(side && side != main ? side : main) {
    if (side_ != main_) err_ = handoff(main_, side_);
  }
  StreamFork(const StreamFork&) = delete;
  StreamFork& operator=(const StreamFork&) = delete;
  ~StreamFork() { join(); }
  cudaStream_t main() const { return main_; }
  cudaStream_t side() const { return side_; }
  cudaError_t handoff(cudaStream_t from, cudaStream_t to) {
    if (from == to) return cudaSuccess;
    cudaEvent_t e = nullptr;
    cudaError_t err = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    if (err == cudaSuccess) err = cudaEventRecord(e, from);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(to, e, 0);
    if (e != nullptr) cudaEventDestroy(e);
    return err;
  }
  cudaError_t join() {
    if (joined_) return err_;
    joined_ = true;
    const cudaError_t err = handoff(side_, main_);
    if (err_ == cudaSuccess) err_ = err;
    return err_;
  }
  cudaError_t status() const { return err_; }

 private:
  cudaStream_t main_, side_;
  cudaError_t err_ = cudaSuccess;
  bool joined_ = false;
};

}  // namespace linflow
