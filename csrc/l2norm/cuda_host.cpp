// Row L2 norm on CUDA, host side: contiguous rows of length <= 256 in fp32 / bf16 / fp16 run the kernel
// (kernel.cu); anything else runs the ATen form.
#ifdef LINFLOW_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/alloc.h"
#include "common/checks.h"
#include "l2norm/l2norm.h"
#include "l2norm/launch.h"

namespace linflow::l2norm {
namespace {
using at::Tensor;

bool kernel_takes(const Tensor& x) {
  const int64_t rows = x.numel() / std::max<int64_t>(x.size(-1), 1);
  return x.size(-1) >= 1 && x.size(-1) <= kMaxDim && x.scalar_type() != at::kDouble &&
         rows / 8 < std::numeric_limits<int>::max();
}

Elem elem(const Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? Elem::bf16 : x.scalar_type() == at::kHalf ? Elem::f16 : Elem::f32;
}

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& x, double eps) {
  check_x("l2norm_fwd", x);
  if (!kernel_takes(x)) return fwd_aten(x, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous();
  Tensor y = new_output(x.sizes(), x.options());
  std::vector<int64_t> rows_shape(x.sizes().begin(), x.sizes().end() - 1);
  Tensor r = new_output(rows_shape, x.options().dtype(at::kFloat));
  const int64_t d = x.size(-1), rows = x.numel() / d;
  C10_CUDA_CHECK(launch_fwd(xc.data_ptr(), y.data_ptr(), r.data_ptr<float>(), rows, static_cast<int>(d),
                            static_cast<float>(eps), elem(x), at::cuda::getCurrentCUDAStream()));
  return {y, r};
}

Tensor bwd_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& rstd) {
  check_bwd(grad_y, x, rstd);
  if (!kernel_takes(x) || rstd.scalar_type() != at::kFloat) return bwd_aten(grad_y, x, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), dyc = grad_y.to(x.scalar_type()).contiguous(), rc = rstd.contiguous();
  Tensor dx = new_output(x.sizes(), x.options());
  const int64_t d = x.size(-1), rows = x.numel() / d;
  C10_CUDA_CHECK(launch_bwd(dyc.data_ptr(), xc.data_ptr(), rc.data_ptr<float>(), dx.data_ptr(), rows,
                            static_cast<int>(d), elem(x), at::cuda::getCurrentCUDAStream()));
  return dx;
}

}  // namespace
}  // namespace linflow::l2norm

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("l2norm_fwd", &linflow::l2norm::fwd_cuda);
  m.impl("l2norm_bwd", &linflow::l2norm::bwd_cuda);
}
#endif  // LINFLOW_WITH_CUDA
