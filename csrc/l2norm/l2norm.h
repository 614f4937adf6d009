// Row L2 norm over the last dim, the q/k normalisation of use_qk_l2norm (fla's convention, in fp32):
//   y = x r,  r = (sum x^2 + eps)^-1/2;   dx = r (dy - y sum(dy y)).
// One ATen form (CPU and any CUDA case the kernel does not take) and a CUDA kernel (kernel.cu).
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace linflow::l2norm {

// Validates x (float, rank >= 1, last dim 1..kMaxDim on the kernel path) and returns the row length.
int64_t check_x(const char* op, const at::Tensor& x);

// Validates the backward's arguments against x (grad_y like x, rstd of x's rows).
void check_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rstd);

std::tuple<at::Tensor, at::Tensor> fwd_aten(const at::Tensor& x, double eps);
at::Tensor bwd_aten(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rstd);

}  // namespace linflow::l2norm
