// Row L2 norm: argument checks, the ATen form (registered for CPU; the CUDA fallback) — see l2norm.h.
#include "l2norm/l2norm.h"

#include <torch/library.h>

#include "common/checks.h"

namespace linflow::l2norm {
using at::Tensor;

int64_t check_x(const char* op, const Tensor& x) {
  TORCH_CHECK(x.defined() && x.dim() >= 1, op, ": x must have at least one dim, got ",
              x.defined() ? shape_str(x.sizes()) : std::string("undefined"));
  std::vector<int64_t> any(x.dim(), -1);
  check_float_tensor(op, "x", x, any, x.device());
  return x.size(-1);
}

namespace {
at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
}  // namespace

std::tuple<Tensor, Tensor> fwd_aten(const Tensor& x, double eps) {
  check_x("l2norm_fwd", x);
  const Tensor xf = x.to(acc_type(x));
  const Tensor r = at::rsqrt(xf.pow(2).sum(-1) + eps);
  return {(xf * r.unsqueeze(-1)).to(x.scalar_type()), r};
}

void check_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& rstd) {
  check_x("l2norm_bwd", x);
  check_float_tensor("l2norm_bwd", "grad_y", grad_y, x.sizes(), x.device());
  std::vector<int64_t> rows(x.sizes().begin(), x.sizes().end() - 1);
  check_float_tensor("l2norm_bwd", "rstd", rstd, rows, x.device());
}

Tensor bwd_aten(const Tensor& grad_y, const Tensor& x, const Tensor& rstd) {
  check_bwd(grad_y, x, rstd);
  const Tensor r = rstd.to(acc_type(x)).unsqueeze(-1);
  const Tensor y = x.to(acc_type(x)) * r, dy = grad_y.to(acc_type(x));
  return (r * (dy - y * (dy * y).sum(-1, true))).to(x.scalar_type());
}

}  // namespace linflow::l2norm

TORCH_LIBRARY_IMPL(linflow, CPU, m) {
  m.impl("l2norm_fwd", &linflow::l2norm::fwd_aten);
  m.impl("l2norm_bwd", &linflow::l2norm::bwd_aten);
}
