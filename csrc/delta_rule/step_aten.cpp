// Delta rule decode step with ATen ops: the token-by-token recurrence over a few tokens against a state cache,
// updating the cache in place. Device-generic, no host sync and no value-dependent allocation (CUDA-graph safe; on
// CUDA it serves bf16/fp16 state caches, the fp32 cache has its own kernel).
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
    if (idx.is_cpu() && idx.numel() > 0) {  // values are readable without a device sync
      const int64_t hi = idx.max().item<int64_t>();
      TORCH_CHECK(hi < state.size(0), op, ": state_indices must be < N = ", state.size(0), " (the state cache rows), got ",
                  hi);
    }
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
  Tensor rows = indexed ? idx.clamp_min(0) : Tensor();
  const Tensor S0 = (indexed ? state.index_select(0, rows) : state).to(acc);  // [B, H, K, V]
  Tensor S = indexed ? S0 * valid.view({-1, 1, 1, 1}).to(acc) : S0;
  Tensor o = at::empty_like(v);
  for (int64_t t = 0; t < q.size(1); ++t) {
    Tensor kt = k.select(1, t).to(acc), qt = q.select(1, t).to(acc), vt = v.select(1, t).to(acc);
    if (g.has_value() && g->defined()) S = S * g->select(1, t).to(acc).exp().view({S.size(0), S.size(1), 1, 1});
    Tensor pred = at::matmul(kt.unsqueeze(-2), S).squeeze(-2);  // S^T k  [B, H, V]
    Tensor delta = (vt - pred) * beta.select(1, t).to(acc).unsqueeze(-1);
    S = S + kt.unsqueeze(-1) * delta.unsqueeze(-2);
    o.select(1, t).copy_(at::matmul(qt.unsqueeze(-2), S).squeeze(-2) * scale);
  }
  if (indexed && state.is_cpu()) {  // exact: copy the valid rows (reading which rows are valid is free on the CPU)
    Tensor keep = valid.nonzero().squeeze(1);
    state.index_copy_(0, rows.index_select(0, keep), S.index_select(0, keep).to(state.scalar_type()));
    o.mul_(valid.view({-1, 1, 1, 1}).to(o.scalar_type()));
  } else if (indexed) {
    // On a device, sync-free: add each row's change to its cache row (exact up to one rounding of the cache dtype).
    // A padding row adds -0.0 (x + -0.0 == x bit for bit, -0.0 included): the row it was clamped onto is untouched.
    Tensor delta = at::where(valid.view({-1, 1, 1, 1}), S - S0, at::full({}, -0.0, S.options()));
    state.index_put_({rows}, delta.to(state.scalar_type()), /*accumulate=*/true);
    o.mul_(valid.view({-1, 1, 1, 1}).to(o.scalar_type()));
  } else {
    state.copy_(S);
  }
  return o;
}

}  // namespace linflow::delta_rule
