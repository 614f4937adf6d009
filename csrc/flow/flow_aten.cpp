// Rank-R delta rule as the delta rule's chunk form on the interleaved sequence (ALGORITHMS.md §2). Row t·R + j
// holds (k_{t,j}, v_{t,j}, beta_{t,j}); the gate g_t sits on row t·R (decay once per token, before its steps);
// q_t sits on row t·R + R - 1 (the output is read after the token's last step); all other q rows are zero.
//   product form:      A strictly lower (R delta steps in order)         -> ChunkOpts::block = 1
//   simultaneous form: A zero between the R rows of one token (one S_{t-1}) -> ChunkOpts::block = R
// Chunks hold (64 / R) whole tokens, so a token never straddles two chunks.
#include "flow/flow.h"

#include "common/checks.h"
#include "delta_rule/delta_rule.h"

namespace linflow::flow {
using at::Tensor;

Form parse_form(const char* op, const std::string& form) {
  if (form == "product") return Form::product;
  if (form == "simultaneous") return Form::simultaneous;
  TORCH_CHECK(false, op, ": form must be \"product\" or \"simultaneous\", got \"", form, "\"");
}

bool parse_scan(const char* op, const std::string& scan) {
  if (scan == "parallel") return true;
  if (scan == "sequential" || scan == "auto") return false;
  TORCH_CHECK(false, op, ": scan must be \"sequential\", \"parallel\" or \"auto\", got \"", scan, "\"");
}

constexpr int64_t kMaxRank = 64;

Shapes check_args(const char* op, const Tensor* q, const Tensor& k, const Tensor& v, const Tensor& beta,
                  const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                  const std::optional<Tensor>& cu_seqlens) {
  // The sizes come from q (from k without q); every other tensor is checked against them.
  if (q)
    TORCH_CHECK(q->defined() && q->dim() == 4, op, ": q must have shape [B, T, H, K], got ",
                q->defined() ? shape_str(q->sizes()) : std::string("undefined"));
  TORCH_CHECK(k.defined() && k.dim() == 5, op, ": k must have shape [B, T, R, H, K], got ",
              k.defined() ? shape_str(k.sizes()) : std::string("undefined"));
  const at::Tensor& base = q ? *q : k;
  const int64_t B = base.size(0), T = base.size(1), R = k.size(2), H = base.size(-2), K = base.size(-1);
  const at::Device dev = base.device();
  if (q) check_float_tensor(op, "q", *q, {B, T, H, K}, dev);
  check_float_tensor(op, "k", k, {B, T, R, H, K}, dev);
  TORCH_CHECK(R >= 1 && R <= kMaxRank, op, ": the rank R = k.size(2) must be in 1..", kMaxRank, ", got ", R);
  TORCH_CHECK(v.defined() && v.dim() == 5, op, ": v must have shape [B, T, R, H, V] = [", B, ", ", T, ", ", R, ", ", H,
              ", V], got ", v.defined() ? shape_str(v.sizes()) : std::string("undefined"));
  const int64_t V = v.size(4);
  check_float_tensor(op, "v", v, {B, T, R, H, V}, dev);
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (!q || q->scalar_type() == k.scalar_type()), op,
              ": q, k, v must share one dtype, got ", q ? c10::toString(q->scalar_type()) : "(no q)", ", k ",
              k.scalar_type(), ", v ", v.scalar_type());
  check_float_tensor(op, "beta", beta, {B, T, R, H}, dev);
  check_optional_float_tensor(op, "g", g, {B, T, H}, dev);
  check_head_dim(op, "head dim K (k.size(-1))", K);
  check_head_dim(op, "head dim V (v.size(-1))", V);
  const int64_t N = check_cu_seqlens(op, cu_seqlens, B, T, dev);
  check_optional_float_tensor(op, "initial_state", initial_state, {N, H, K, V}, dev);
  return {B, T, R, H, K, V, N};
}

// [B, T, ...] placed on sub-step `j` of each token of the interleaved [B, T·R, ...] sequence, zeros elsewhere.
Tensor on_substep(const Tensor& x, int64_t R, int64_t j) {
  if (R == 1) return x;
  std::vector<int64_t> split = x.sizes().vec();
  split.insert(split.begin() + 2, R);
  Tensor out = at::empty(split, x.options());  // each sub-step written once: x on j, zeros elsewhere
  for (int64_t i = 0; i < R; ++i) {
    if (i == j) out.select(2, i).copy_(x);
    else out.select(2, i).zero_();
  }
  std::vector<int64_t> merged = x.sizes().vec();
  merged[1] *= R;
  return out.view(merged);
}

// Inverse of on_substep: sub-step `j` of an interleaved [B, T·R, ...] tensor.
Tensor take_substep(const Tensor& x, int64_t R, int64_t j) {
  if (R == 1) return x;
  std::vector<int64_t> view = x.sizes().vec();
  view[1] /= R;
  view.insert(view.begin() + 2, R);
  return x.view(view).select(2, j).contiguous();
}

namespace {

// [B, T, R, ...] -> [B, T·R, ...]
Tensor merge_rank(const Tensor& x) {
  std::vector<int64_t> out = x.sizes().vec();
  out[1] *= out[2];
  out.erase(out.begin() + 2);
  return x.reshape(out);
}

std::optional<Tensor> gate_interleaved(const std::optional<Tensor>& g, int64_t R) {
  if (!g.has_value() || !g->defined()) return std::nullopt;
  return on_substep(*g, R, 0);
}

std::optional<Tensor> cu_interleaved(const std::optional<Tensor>& cu, int64_t R) {
  if (!cu.has_value() || !cu->defined() || R == 1) return cu;
  return *cu * R;
}

delta_rule::ChunkOpts chunk_opts(int64_t R, Form form, bool scan) {
  return {(64 / R) * R, form == Form::simultaneous ? R : 1, scan};
}

}  // namespace

Interleaved interleave(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                       const std::optional<Tensor>& g, const std::optional<Tensor>& cu_seqlens, int64_t R) {
  return {on_substep(q, R, R - 1), merge_rank(k), merge_rank(v), merge_rank(beta), gate_interleaved(g, R),
          cu_interleaved(cu_seqlens, R)};
}

std::tuple<Tensor, Tensor> fwd_aten(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                    const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                                    const std::optional<Tensor>& cu_seqlens, double scale, bool output_final_state,
                                    c10::string_view form, c10::string_view scan) {
  const char* op = "flow_fwd";
  const Form fm = parse_form(op, std::string(form));
  const bool par = parse_scan(op, std::string(scan));
  const Shapes s = check_args(op, &q, k, v, beta, g, initial_state, cu_seqlens);
  const int64_t R = s.R;
  const Interleaved x = interleave(q, k, v, beta, g, cu_seqlens, R);
  auto [o, ht] = delta_rule::fwd_chunked(x.q, x.k, x.v, x.beta, x.g, initial_state, x.cu, scale, output_final_state,
                                         chunk_opts(R, fm, par));
  return {take_substep(o, R, R - 1), ht};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_aten(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
    const std::optional<Tensor>& initial_state, const std::optional<Tensor>& cu_seqlens, const Tensor& grad_o,
    const std::optional<Tensor>& grad_final_state, double scale, c10::string_view form, c10::string_view scan) {
  const char* op = "flow_bwd";
  const Form fm = parse_form(op, std::string(form));
  const bool par = parse_scan(op, std::string(scan));
  const Shapes s = check_args(op, &q, k, v, beta, g, initial_state, cu_seqlens);
  check_float_tensor(op, "grad_o", grad_o, {s.B, s.T, s.H, s.V}, q.device());
  std::optional<Tensor> dht = grad_final_state;
  if (dht.has_value() && dht->defined() && dht->numel() == 0) dht.reset();
  check_optional_float_tensor(op, "grad_final_state", dht, {s.N, s.H, s.K, s.V}, q.device());
  const int64_t R = s.R;
  const Interleaved x = interleave(q, k, v, beta, g, cu_seqlens, R);
  return deinterleave_grads(delta_rule::bwd_chunked(x.q, x.k, x.v, x.beta, x.g, initial_state, x.cu,
                                                    on_substep(grad_o, R, R - 1), dht, scale, chunk_opts(R, fm, par)),
                            k, v, beta, g, R);
}

delta_rule::Grads deinterleave_grads(delta_rule::Grads grads, const Tensor& k, const Tensor& v, const Tensor& beta,
                                     const std::optional<Tensor>& g, int64_t R) {
  auto& [dq, dk, dv, dbeta, dg, dh0] = grads;
  const bool gated = g.has_value() && g->defined();
  return {take_substep(dq, R, R - 1), dk.view(k.sizes()), dv.view(v.sizes()), dbeta.view(beta.sizes()),
          gated ? take_substep(dg, R, 0) : dg, dh0};
}

std::tuple<Tensor, Tensor> transition(const Tensor& k, const Tensor& v, const Tensor& beta,
                                      const std::optional<Tensor>& g, c10::string_view form, int64_t segment) {
  const char* op = "flow_transition";
  const Form fm = parse_form(op, std::string(form));
  const Shapes s = check_args(op, nullptr, k, v, beta, g, std::nullopt, std::nullopt);
  TORCH_CHECK(segment >= 1, op, ": segment (tokens per segment) must be >= 1, got ", segment);
  return delta_rule::chunk_transitions(merge_rank(k), merge_rank(v), merge_rank(beta), gate_interleaved(g, s.R),
                                       segment * s.R, fm == Form::simultaneous ? s.R : 1);
}

}  // namespace linflow::flow
