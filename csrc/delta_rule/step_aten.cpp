// Delta rule decode step with ATen ops: the token-by-token recurrence over a few tokens against a state cache,
// updating the cache in place. Device-generic, no host sync and no value-dependent allocation (CUDA-graph safe).
//   S <- a_t S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = s S^T q_t
#include "common/checks.h"
#include "delta_rule/delta_rule.h"

namespace linflow::delta_rule {
using at::Tensor;

void check_step_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                     const std::optional<Tensor>& g, const Tensor& state, const std::optional<Tensor>& state_indices) {
  const char* op = "delta_rule_step";
  const Shapes s = check_args(op, q, k, v, beta, g, std::nullopt, std::nullopt, 64);
  TORCH_CHECK(state.defined() && state.dim() == 4, op, ": state must have shape [N, H, K, V] = [N, ", s.H, ", ", s.K, ", ",
              s.V, "], got ", state.defined() ? shape_str(state.sizes()) : std::string("undefined"));
  check_float_tensor(op, "state", state, {-1, s.H, s.K, s.V}, q.device());
  TORCH_CHECK(state.is_contiguous(), op, ": state must be contiguous (it is updated in place)");
  if (state_indices.has_value() && state_indices->defined()) {
    const Tensor& idx = *state_indices;
    TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op,
                ": state_indices must be int32 or int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == s.B, op, ": state_indices must have shape [B] = [", s.B, "], got ",
                shape_str(idx.sizes()));
    TORCH_CHECK(idx.device() == q.device(), op, ": state_indices is on ", idx.device(), " but q is on ", q.device());
  } else {
    TORCH_CHECK(state.size(0) == s.B, op, ": without state_indices, state must have N = B = ", s.B, " rows, got ",
                state.size(0));
  }
}

Tensor step_aten(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
                 Tensor state, const std::optional<Tensor>& state_indices, double scale) {
  check_step_args(q, k, v, beta, g, state, state_indices);
  const auto acc = state.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool indexed = state_indices.has_value() && state_indices->defined();
  // A negative index marks a padding row of the batch: it reads a zero state, writes nothing and outputs zeros.
  Tensor idx = indexed ? state_indices->to(at::kLong) : Tensor();
  Tensor valid = indexed ? idx.ge(0) : Tensor();
  Tensor S = (indexed ? state.index_select(0, idx.clamp_min(0)) : state).to(acc);  // [B, H, K, V]
  if (indexed) S = S * valid.view({-1, 1, 1, 1}).to(acc);
  Tensor o = at::empty_like(v);
  for (int64_t t = 0; t < q.size(1); ++t) {
    Tensor kt = k.select(1, t).to(acc), qt = q.select(1, t).to(acc), vt = v.select(1, t).to(acc);
    if (g.has_value() && g->defined()) S = S * g->select(1, t).to(acc).exp().view({S.size(0), S.size(1), 1, 1});
    Tensor pred = at::matmul(kt.unsqueeze(-2), S).squeeze(-2);  // S^T k  [B, H, V]
    Tensor delta = (vt - pred) * beta.select(1, t).to(acc).unsqueeze(-1);
    S = S + kt.unsqueeze(-1) * delta.unsqueeze(-2);
    o.select(1, t).copy_(at::matmul(qt.unsqueeze(-2), S).squeeze(-2) * scale);
  }
  if (indexed) {
    Tensor rows = valid.nonzero().squeeze(1);  // host sync: the CPU path only (CUDA has its own kernel)
    state.index_copy_(0, idx.index_select(0, rows), S.index_select(0, rows).to(state.scalar_type()));
    o.mul_(valid.view({-1, 1, 1, 1}).to(o.scalar_type()));
  } else {
    state.copy_(S);
  }
  return o;
}

}  // namespace linflow::delta_rule
