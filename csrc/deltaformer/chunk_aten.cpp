// Deltaformer, chunk form written with ATen ops: device-generic, batched over (sequence, head), a loop over chunks
// of C rows and, inside, over key blocks (online log-sum-exp, FlashAttention-style). Math: ALGORITHMS.md §3.
// All arithmetic in fp32 (fp64 for fp64 inputs). Per write (KV) head, s = scale, rows i, keys j:
//   P_ij = exp(s w_i.k_j - lse_w_i) for j < i,   (I + diag(beta) P) U = V,   R = P U
//   O    = softmax_causal(s Q K^T) U  (GQA: query head h reads KV head h / (H / Hkv)),  lse_o per query row
// Reads q, k, v, w, beta; writes o, u, r, lse_w, lse_o (forward) and dq, dk, dv, dbeta, dw (backward).
#include "common/alloc.h"
#include "common/checks.h"
#include "deltaformer/deltaformer.h"

#include <limits>
#include <vector>

namespace linflow::deltaformer {
using at::Tensor;

Shapes check_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                  const std::optional<Tensor>& w, const std::optional<Tensor>& cu_seqlens, int64_t chunk_size) {
  const QKVShape qkv = check_qkv(op, q, k, v, /*grouped=*/true);
  const int64_t B = qkv.B, T = qkv.T, H = qkv.H, Hkv = qkv.Hkv, K = qkv.K, V = qkv.V;
  const at::Device dev = q.device();
  check_optional_float_tensor(op, "w", w, {B, T, Hkv, K}, dev);
  if (w.has_value() && w->defined())
    TORCH_CHECK(w->scalar_type() == q.scalar_type(), op, ": w must have q's dtype ", q.scalar_type(), ", got ",
                w->scalar_type());
  check_optional_float_tensor(op, "beta", beta, {B, T, Hkv}, dev);
  TORCH_CHECK(chunk_size == 16 || chunk_size == 32 || chunk_size == 64, op, ": chunk_size must be 16, 32 or 64, got ",
              chunk_size);
  const int64_t N = check_cu_seqlens(op, cu_seqlens, B, T, dev);
  return {B, T, H, Hkv, K, V, N};
}

namespace {

constexpr int64_t kKeyBlockChunks = 4;  // a key block spans this many chunks

at::ScalarType acc_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// [B, T, Hx, D] -> [B*Hx, T, D] in `acc`;  [B, T, Hx] -> [B*Hx, T].
Tensor to_bh(const Tensor& x, at::ScalarType acc) {
  const int64_t B = x.size(0), T = x.size(1), Hx = x.size(2);
  if (x.dim() == 3) return x.permute({0, 2, 1}).reshape({B * Hx, T}).to(acc);
  return x.permute({0, 2, 1, 3}).reshape({B * Hx, T, x.size(3)}).to(acc);
}

// Inverse of to_bh: [B*Hx, T(, D)] -> [B, T, Hx(, D)] in `dtype`.
Tensor from_bh(const Tensor& x, int64_t B, at::ScalarType dtype) {
  const int64_t Hx = x.size(0) / B, T = x.size(1);
  if (x.dim() == 2) return x.view({B, Hx, T}).permute({0, 2, 1}).to(dtype).contiguous();
  return x.view({B, Hx, T, x.size(2)}).permute({0, 2, 1, 3}).to(dtype).contiguous();
}

// KV head tensor [B*Hkv, T, D] seen by the G query heads of its group: [B*H, T, D] (query head h -> KV head h / G).
Tensor expand_groups(const Tensor& x, int64_t B, int64_t G) {
  if (G == 1) return x;
  const int64_t Hkv = x.size(0) / B, T = x.size(1), D = x.size(2);
  return x.view({B, Hkv, 1, T, D}).expand({B, Hkv, G, T, D}).reshape({B * Hkv * G, T, D});
}

// Gradient of expand_groups: sum over the G query heads of each group.
Tensor reduce_groups(const Tensor& x, int64_t B, int64_t G) {
  if (G == 1) return x;
  const int64_t Hkv = x.size(0) / B / G, T = x.size(1), D = x.size(2);
  return x.view({B, Hkv, G, T, D}).sum(2).view({B * Hkv, T, D});
}

// Entries of the (rows [i0, i0+Ci)) x (keys [j0, j0+Cj)) tile that a causal softmax must drop: j > i, or j >= i
// when `strict`. Undefined when the tile keeps everything.
Tensor dropped(int64_t i0, int64_t Ci, int64_t j0, int64_t Cj, bool strict, const at::TensorOptions& opts) {
  if (j0 + Cj - 1 < i0 + (strict ? 0 : 1)) return Tensor();
  Tensor i = at::arange(i0, i0 + Ci, opts.dtype(at::kLong)).unsqueeze(1);
  Tensor j = at::arange(j0, j0 + Cj, opts.dtype(at::kLong)).unsqueeze(0);
  return strict ? j >= i : j > i;
}

// Online softmax state of a block of rows: running max m, sum l of exp(score - m), and sum of exp(score - m) * value.
struct Online {
  Tensor m, l, acc;  // [BH, Ci], [BH, Ci], [BH, Ci, V]
  Online(int64_t BH, int64_t Ci, int64_t V, const at::TensorOptions& opts)
      : m(at::full({BH, Ci}, -std::numeric_limits<double>::infinity(), opts)),
        l(at::zeros({BH, Ci}, opts)),
        acc(at::zeros({BH, Ci, V}, opts)) {}

  // Shift of the exponent: the running max, 0 where a row has seen no key yet (so exp never sees -inf - -inf).
  static Tensor shift(const Tensor& m) { return at::where(at::isneginf(m), at::zeros_like(m), m); }

  // Adds a tile of scores ([BH, Ci, Cj], dropped entries -inf); `values` ([BH, Cj, V]) may be undefined (the
  // normaliser only). Returns exp(scores - shift) of the tile.
  Tensor update(const Tensor& scores, const Tensor& values) {
    Tensor m_new = at::maximum(m, std::get<0>(scores.max(-1)));
    Tensor sh = shift(m_new);
    Tensor alpha = (m - sh).exp();  // m = -inf: 0
    Tensor p = (scores - sh.unsqueeze(-1)).exp();
    l = l * alpha + p.sum(-1);
    acc = acc * alpha.unsqueeze(-1);
    if (values.defined()) acc.baddbmm_(p, values);
    m = m_new;
    return p;
  }
  // log sum exp per row; 0 for a row without keys (its probabilities are all masked to 0 anyway).
  Tensor lse() const { return at::where(l > 0, shift(m) + l.log(), at::zeros_like(l)); }
  // sum_j softmax_j * value_j (0 for a row without keys)
  Tensor normalised() const { return acc / at::where(l > 0, l, at::ones_like(l)).unsqueeze(-1); }
};

// Scores s * A B^T of a tile with the dropped entries at -inf.
Tensor tile_scores(const Tensor& a, const Tensor& b, double scale, const Tensor& drop) {
  Tensor s = at::bmm(a, b.transpose(1, 2)).mul_(scale);
  if (drop.defined()) s.masked_fill_(drop, -std::numeric_limits<double>::infinity());
  return s;
}

// Probabilities exp(s A B^T - lse) of a tile, 0 on dropped entries.
Tensor tile_probs(const Tensor& a, const Tensor& b, double scale, const Tensor& lse, const Tensor& drop) {
  return (tile_scores(a, b, scale, drop) - lse.unsqueeze(-1)).exp();
}

struct Inputs {  // everything in [BH, T, D] / [BH, T], accumulation dtype
  Tensor q, k, v, w, beta;
  int64_t B, G;
};

// The write pass's inputs only (in.q undefined).
Inputs bh_write_inputs(const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                       const std::optional<Tensor>& w, int64_t H) {
  const auto acc = acc_type(k);
  Inputs in;
  in.k = to_bh(k, acc);
  in.v = to_bh(v, acc);
  in.w = present(w) ? to_bh(*w, acc) : in.k;
  in.beta = present(beta) ? to_bh(*beta, acc) : at::ones({in.k.size(0), in.k.size(1)}, in.k.options());
  in.B = k.size(0);
  in.G = H / k.size(2);
  return in;
}

Inputs bh_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                 const std::optional<Tensor>& w) {
  Inputs in = bh_write_inputs(k, v, beta, w, q.size(2));
  in.q = to_bh(q, acc_type(q));
  return in;
}

// Write pass: U (and R = P U, lse_w) chunk by chunk. Per chunk c, rows [i0, i1):
//   online lse over keys j < i0 (accumulating P U), then the diagonal tile (j < i);  R_prior = P[c, <c] U_<c
//   (I + diag(beta_c) P_cc) U_c = V_c - diag(beta_c) R_prior   (forward substitution);  R_c = R_prior + P_cc U_c
void write_pass(const Inputs& in, double scale, int64_t C, Tensor& U, Tensor& R, Tensor& lse_w) {
  const int64_t BH = in.k.size(0), T = in.k.size(1), V = in.v.size(2), KB = C * kKeyBlockChunks;
  const auto opts = in.k.options();
  U = at::empty({BH, T, V}, opts);
  R = at::empty({BH, T, V}, opts);
  lse_w = at::empty({BH, T}, opts);
  for (int64_t i0 = 0; i0 < T; i0 += C) {
    const int64_t Ci = std::min(C, T - i0);
    Tensor wc = in.w.narrow(1, i0, Ci), kc = in.k.narrow(1, i0, Ci), bc = in.beta.narrow(1, i0, Ci);
    Online st(BH, Ci, V, opts);
    for (int64_t j0 = 0; j0 < i0; j0 += KB) {
      const int64_t Cj = std::min(KB, i0 - j0);
      st.update(tile_scores(wc, in.k.narrow(1, j0, Cj), scale, Tensor()), U.narrow(1, j0, Cj));
    }
    st.update(tile_scores(wc, kc, scale, dropped(i0, Ci, i0, Ci, true, opts)), Tensor());
    Tensor lse = st.lse();
    Tensor r_prior = st.normalised();
    Tensor p_cc = tile_probs(wc, kc, scale, lse, dropped(i0, Ci, i0, Ci, true, opts));
    Tensor system = at::eye(Ci, opts).expand({BH, Ci, Ci}) + bc.unsqueeze(-1) * p_cc;
    Tensor uc = at::linalg_solve_triangular(system, in.v.narrow(1, i0, Ci) - bc.unsqueeze(-1) * r_prior,
                                            /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
    U.narrow(1, i0, Ci).copy_(uc);
    R.narrow(1, i0, Ci).copy_(r_prior.baddbmm(p_cc, uc));
    lse_w.narrow(1, i0, Ci).copy_(lse);
  }
}

// Read pass: causal softmax attention of Q over (K, U), query chunk by query chunk, online over key blocks.
void read_pass(const Tensor& q, const Tensor& k, const Tensor& u, double scale, int64_t C, Tensor& O, Tensor& lse_o) {
  const int64_t BH = q.size(0), T = q.size(1), V = u.size(2), KB = C * kKeyBlockChunks;
  const auto opts = q.options();
  O = at::empty({BH, T, V}, opts);
  lse_o = at::empty({BH, T}, opts);
  for (int64_t i0 = 0; i0 < T; i0 += C) {
    const int64_t Ci = std::min(C, T - i0);
    Tensor qc = q.narrow(1, i0, Ci);
    Online st(BH, Ci, V, opts);
    for (int64_t j0 = 0; j0 < i0 + Ci; j0 += KB) {
      const int64_t Cj = std::min(KB, i0 + Ci - j0);
      st.update(tile_scores(qc, k.narrow(1, j0, Cj), scale, dropped(i0, Ci, j0, Cj, false, opts)),
                u.narrow(1, j0, Cj));
    }
    O.narrow(1, i0, Ci).copy_(st.normalised());
    lse_o.narrow(1, i0, Ci).copy_(st.lse());
  }
}

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

Outputs fwd_dense(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                  const std::optional<Tensor>& w, double scale, int64_t C) {
  const auto acc = acc_type(q);
  Inputs in = bh_inputs(q, k, v, beta, w);
  Tensor U, R, lse_w, O, lse_o;
  write_pass(in, scale, C, U, R, lse_w);
  read_pass(in.q, expand_groups(in.k, in.B, in.G), expand_groups(U, in.B, in.G), scale, C, O, lse_o);
  return {from_bh(O, in.B, q.scalar_type()), from_bh(U, in.B, acc), from_bh(R, in.B, acc), from_bh(lse_w, in.B, acc),
          from_bh(lse_o, in.B, acc)};
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Backward of the read pass (FlashAttention-2 style, from the stored lse_o and Drow = rowsum(dO o O)):
//   P = exp(s Q K^T - lse_o),  dS = P o (dO U^T - Drow),  dQ = s dS K,  dK = s dS^T Q,  dU = P^T dO
void read_backward(const Tensor& q, const Tensor& k, const Tensor& u, const Tensor& o, const Tensor& lse_o,
                   const Tensor& dO, double scale, int64_t C, Tensor& dq, Tensor& dk, Tensor& du) {
  const int64_t T = q.size(1), KB = C * kKeyBlockChunks;
  const auto opts = q.options();
  dq = at::zeros_like(q);
  dk = at::zeros_like(k);
  du = at::zeros_like(u);
  Tensor drow = (dO * o).sum(-1);
  for (int64_t i0 = 0; i0 < T; i0 += C) {
    const int64_t Ci = std::min(C, T - i0);
    Tensor qc = q.narrow(1, i0, Ci), doc = dO.narrow(1, i0, Ci), lc = lse_o.narrow(1, i0, Ci);
    Tensor dc = drow.narrow(1, i0, Ci).unsqueeze(-1), dqc = dq.narrow(1, i0, Ci);
    for (int64_t j0 = 0; j0 < i0 + Ci; j0 += KB) {
      const int64_t Cj = std::min(KB, i0 + Ci - j0);
      Tensor kb = k.narrow(1, j0, Cj), ub = u.narrow(1, j0, Cj);
      Tensor p = tile_probs(qc, kb, scale, lc, dropped(i0, Ci, j0, Cj, false, opts));
      Tensor ds = p * (at::bmm(doc, ub.transpose(1, 2)) - dc);
      dqc.baddbmm_(ds, kb, 1.0, scale);
      dk.narrow(1, j0, Cj).baddbmm_(ds.transpose(1, 2), qc, 1.0, scale);
      du.narrow(1, j0, Cj).baddbmm_(p.transpose(1, 2), doc);
    }
  }
}

// Backward of the write pass: dV = (I + diag(beta) P)^-T dU by backward substitution, chunks in reverse order; each
// (i, j) pair is visited once, when row chunk c(i) is processed: it sends beta_i P_ij dV_i to the pending sum of row
// j (`pending`, consumed when j's chunk is solved) and adds to dW_i, dK_j. With Delta_i = sum_j P_ij dP_ij
// = -beta_i dV_i.R_i = beta_i dbeta_i (R stored by the forward):
//   dbeta_i = -dV_i.R_i,  dP_ij = -beta_i dV_i.U_j,  dA_ij = P_ij (dP_ij - Delta_i),  dW = s dA K,  dK = s dA^T W
void write_backward(const Inputs& in, const Tensor& U, const Tensor& R, const Tensor& lse_w, const Tensor& dU,
                    double scale, int64_t C, Tensor& dv, Tensor& dbeta, Tensor& dw, Tensor& dk) {
  const int64_t BH = in.k.size(0), T = in.k.size(1), KB = C * kKeyBlockChunks;
  const auto opts = in.k.options();
  Tensor pending = at::zeros_like(dU);
  dv = at::empty_like(dU);
  dbeta = at::empty({BH, T}, opts);
  dw = at::zeros_like(in.w);
  dk = at::zeros_like(in.k);
  const int64_t NC = (T + C - 1) / C;
  for (int64_t c = NC - 1; c >= 0; --c) {
    const int64_t i0 = c * C, Ci = std::min(C, T - i0);
    Tensor wc = in.w.narrow(1, i0, Ci), kc = in.k.narrow(1, i0, Ci), uc = U.narrow(1, i0, Ci);
    Tensor bc = in.beta.narrow(1, i0, Ci).unsqueeze(-1), lc = lse_w.narrow(1, i0, Ci);
    Tensor p_cc = tile_probs(wc, kc, scale, lc, dropped(i0, Ci, i0, Ci, true, opts));
    Tensor system_t = (at::eye(Ci, opts).expand({BH, Ci, Ci}) + bc * p_cc).transpose(1, 2);
    Tensor dvc = at::linalg_solve_triangular(system_t, dU.narrow(1, i0, Ci) - pending.narrow(1, i0, Ci),
                                             /*upper=*/true, /*left=*/true, /*unitriangular=*/true);
    dv.narrow(1, i0, Ci).copy_(dvc);
    Tensor dbc = -(dvc * R.narrow(1, i0, Ci)).sum(-1);
    dbeta.narrow(1, i0, Ci).copy_(dbc);
    Tensor delta = bc * dbc.unsqueeze(-1);  // [BH, Ci, 1]
    Tensor dwc = dw.narrow(1, i0, Ci);
    auto pairs = [&](const Tensor& p, int64_t j0, int64_t Cj) {
      Tensor kb = in.k.narrow(1, j0, Cj);
      Tensor da = p * (-bc * at::bmm(dvc, U.narrow(1, j0, Cj).transpose(1, 2)) - delta);
      dwc.baddbmm_(da, kb, 1.0, scale);
      dk.narrow(1, j0, Cj).baddbmm_(da.transpose(1, 2), wc, 1.0, scale);
    };
    pairs(p_cc, i0, Ci);
    for (int64_t j0 = 0; j0 < i0; j0 += KB) {
      const int64_t Cj = std::min(KB, i0 - j0);
      Tensor p = tile_probs(wc, in.k.narrow(1, j0, Cj), scale, lc, Tensor());
      pending.narrow(1, j0, Cj).baddbmm_((bc * p).transpose(1, 2), dvc);
      pairs(p, j0, Cj);
    }
  }
}

Grads bwd_dense(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                const std::optional<Tensor>& w, const Tensor& o, const Tensor& u, const Tensor& r, const Tensor& lse_w,
                const Tensor& lse_o, const Tensor& grad_o, const std::optional<Tensor>& grad_u, double scale,
                int64_t C) {
  const auto acc = acc_type(q);
  Inputs in = bh_inputs(q, k, v, beta, w);
  const int64_t B = in.B, G = in.G;
  Tensor U = to_bh(u, acc), R = to_bh(r, acc);
  Tensor dq, dk_read, du_read;
  read_backward(in.q, expand_groups(in.k, B, G), expand_groups(U, B, G), to_bh(o, acc), to_bh(lse_o, acc),
                to_bh(grad_o, acc), scale, C, dq, dk_read, du_read);
  Tensor dU = reduce_groups(du_read, B, G);
  if (present(grad_u)) dU = dU + to_bh(*grad_u, acc);
  Tensor dv, dbeta, dw, dk;
  write_backward(in, U, R, to_bh(lse_w, acc), dU, scale, C, dv, dbeta, dw, dk);
  dk += reduce_groups(dk_read, B, G);
  if (!present(w)) dk += dw;
  return {from_bh(dq, B, q.scalar_type()), from_bh(dk, B, k.scalar_type()), from_bh(dv, B, v.scalar_type()),
          present(beta) ? from_bh(dbeta, B, beta->scalar_type()) : at::empty({0}, q.options()),
          present(w) ? from_bh(dw, B, w->scalar_type()) : at::empty({0}, q.options())};
}

std::vector<int64_t> host_offsets(const Tensor& cu) {
  Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

std::optional<Tensor> slice_seq(const std::optional<Tensor>& x, int64_t bos, int64_t len) {
  if (!present(x)) return std::nullopt;
  return x->narrow(1, bos, len);
}

}  // namespace

Outputs fwd_aten(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                 const std::optional<Tensor>& w, const std::optional<Tensor>& cu_seqlens, double scale,
                 int64_t chunk_size) {
  const Shapes s = check_args("deltaformer_fwd", q, k, v, beta, w, cu_seqlens, chunk_size);
  const auto acc = q.options().dtype(acc_type(q));
  if (!present(cu_seqlens)) {
    if (s.T == 0)
      return {at::empty({s.B, 0, s.H, s.V}, q.options()), at::empty({s.B, 0, s.Hkv, s.V}, acc),
              at::empty({s.B, 0, s.Hkv, s.V}, acc), at::empty({s.B, 0, s.Hkv}, acc), at::empty({s.B, 0, s.H}, acc)};
    return fwd_dense(q, k, v, beta, w, scale, chunk_size);
  }
  // Variable length: each sequence runs alone.
  const auto off = host_offsets(*cu_seqlens);
  Tensor o = new_output({1, s.T, s.H, s.V}, q.options());
  Tensor u = new_output({1, s.T, s.Hkv, s.V}, acc), r = new_output({1, s.T, s.Hkv, s.V}, acc);
  Tensor lse_w = new_output({1, s.T, s.Hkv}, acc), lse_o = new_output({1, s.T, s.H}, acc);
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t bos = off[n], len = off[n + 1] - bos;
    if (len == 0) continue;
    auto [on, un, rn, lwn, lon] = fwd_dense(q.narrow(1, bos, len), k.narrow(1, bos, len), v.narrow(1, bos, len),
                                            slice_seq(beta, bos, len), slice_seq(w, bos, len), scale, chunk_size);
    o.narrow(1, bos, len).copy_(on);
    u.narrow(1, bos, len).copy_(un);
    r.narrow(1, bos, len).copy_(rn);
    lse_w.narrow(1, bos, len).copy_(lwn);
    lse_o.narrow(1, bos, len).copy_(lon);
  }
  return {o, u, r, lse_w, lse_o};
}

Shapes check_bwd_args(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                      const std::optional<Tensor>& w, const std::optional<Tensor>& cu_seqlens, const Tensor& o,
                      const Tensor& u, const Tensor& r, const Tensor& lse_w, const Tensor& lse_o, const Tensor& grad_o,
                      const std::optional<Tensor>& grad_u, int64_t chunk_size, std::optional<Tensor>& du) {
  const char* op = "deltaformer_bwd";
  const Shapes s = check_args(op, q, k, v, beta, w, cu_seqlens, chunk_size);
  const at::Device dev = q.device();
  check_float_tensor(op, "o", o, {s.B, s.T, s.H, s.V}, dev);
  check_float_tensor(op, "u", u, {s.B, s.T, s.Hkv, s.V}, dev);
  check_float_tensor(op, "r", r, {s.B, s.T, s.Hkv, s.V}, dev);
  check_float_tensor(op, "lse_w", lse_w, {s.B, s.T, s.Hkv}, dev);
  check_float_tensor(op, "lse_o", lse_o, {s.B, s.T, s.H}, dev);
  check_float_tensor(op, "grad_o", grad_o, {s.B, s.T, s.H, s.V}, dev);
  du = grad_u;
  if (present(du) && du->numel() == 0 && s.B * s.T * s.Hkv * s.V != 0) du.reset();
  check_optional_float_tensor(op, "grad_u", du, {s.B, s.T, s.Hkv, s.V}, dev);
  return s;
}

std::tuple<Tensor, Tensor, Tensor> write_fwd(const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                                             const std::optional<Tensor>& w, const std::optional<Tensor>& cu_seqlens,
                                             double scale, int64_t chunk_size) {
  const int64_t B = k.size(0), T = k.size(1), Hkv = k.size(2), V = v.size(3);
  const auto acc = acc_type(k);
  auto dense = [&](const Tensor& kx, const Tensor& vx, const std::optional<Tensor>& bx,
                   const std::optional<Tensor>& wx) -> std::tuple<Tensor, Tensor, Tensor> {
    Inputs in = bh_write_inputs(kx, vx, bx, wx, Hkv);
    Tensor U, R, lse_w;
    write_pass(in, scale, chunk_size, U, R, lse_w);
    return {from_bh(U, in.B, acc), from_bh(R, in.B, acc), from_bh(lse_w, in.B, acc)};
  };
  if (T == 0) {
    const auto opts = k.options().dtype(acc);
    return {at::empty({B, 0, Hkv, V}, opts), at::empty({B, 0, Hkv, V}, opts), at::empty({B, 0, Hkv}, opts)};
  }
  if (!present(cu_seqlens)) return dense(k, v, beta, w);
  const auto off = host_offsets(*cu_seqlens);  // variable length: each sequence runs alone
  const auto opts = k.options().dtype(acc);
  Tensor u = new_output({1, T, Hkv, V}, opts), r = new_output({1, T, Hkv, V}, opts);
  Tensor lse_w = new_output({1, T, Hkv}, opts);
  for (size_t n = 0; n + 1 < off.size(); ++n) {
    const int64_t bos = off[n], len = off[n + 1] - bos;
    if (len == 0) continue;
    auto [un, rn, ln] = dense(k.narrow(1, bos, len), v.narrow(1, bos, len), slice_seq(beta, bos, len),
                              slice_seq(w, bos, len));
    u.narrow(1, bos, len).copy_(un);
    r.narrow(1, bos, len).copy_(rn);
    lse_w.narrow(1, bos, len).copy_(ln);
  }
  return {u, r, lse_w};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> write_bwd(const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                                                     const std::optional<Tensor>& w,
                                                     const std::optional<Tensor>& cu_seqlens, const Tensor& u,
                                                     const Tensor& r, const Tensor& lse_w, const Tensor& du,
                                                     double scale, int64_t chunk_size) {
  const auto acc = acc_type(k);
  auto dense = [&](const Tensor& kx, const Tensor& vx, const std::optional<Tensor>& bx, const std::optional<Tensor>& wx,
                   const Tensor& ux, const Tensor& rx, const Tensor& lx,
                   const Tensor& dux) -> std::tuple<Tensor, Tensor, Tensor, Tensor> {
    Inputs in = bh_write_inputs(kx, vx, bx, wx, kx.size(2));
    Tensor dv, dbeta, dw, dk;
    write_backward(in, to_bh(ux, acc), to_bh(rx, acc), to_bh(lx, acc), to_bh(dux, acc), scale, chunk_size, dv, dbeta,
                   dw, dk);
    return {from_bh(dv, in.B, acc), from_bh(dbeta, in.B, acc), from_bh(dw, in.B, acc), from_bh(dk, in.B, acc)};
  };
  const auto opts = k.options().dtype(acc);
  if (k.size(1) == 0)
    return {at::zeros(v.sizes(), opts), at::zeros({k.size(0), 0, k.size(2)}, opts), at::zeros(k.sizes(), opts),
            at::zeros(k.sizes(), opts)};
  if (!present(cu_seqlens)) return dense(k, v, beta, w, u, r, lse_w, du);
  const auto off = host_offsets(*cu_seqlens);
  Tensor dv = at::zeros(v.sizes(), opts), dbeta = at::zeros({k.size(0), k.size(1), k.size(2)}, opts);
  Tensor dw = at::zeros(k.sizes(), opts), dk = at::zeros(k.sizes(), opts);
  for (size_t n = 0; n + 1 < off.size(); ++n) {
    const int64_t bos = off[n], len = off[n + 1] - bos;
    if (len == 0) continue;
    auto sl = [&](const Tensor& x) { return x.narrow(1, bos, len); };
    auto [dvn, dbn, dwn, dkn] = dense(sl(k), sl(v), slice_seq(beta, bos, len), slice_seq(w, bos, len), sl(u), sl(r),
                                      sl(lse_w), sl(du));
    sl(dv).copy_(dvn);
    sl(dbeta).copy_(dbn);
    sl(dw).copy_(dwn);
    sl(dk).copy_(dkn);
  }
  return {dv, dbeta, dw, dk};
}

Grads bwd_aten(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
               const std::optional<Tensor>& w, const std::optional<Tensor>& cu_seqlens, const Tensor& o,
               const Tensor& u, const Tensor& r, const Tensor& lse_w, const Tensor& lse_o, const Tensor& grad_o,
               const std::optional<Tensor>& grad_u, double scale, int64_t chunk_size) {
  std::optional<Tensor> du;
  const Shapes s = check_bwd_args(q, k, v, beta, w, cu_seqlens, o, u, r, lse_w, lse_o, grad_o, grad_u, chunk_size, du);
  auto empty_or = [&](const std::optional<Tensor>& x) { return present(x) ? at::zeros_like(*x) : at::empty({0}, q.options()); };
  if (!present(cu_seqlens)) {
    if (s.T == 0) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v), empty_or(beta), empty_or(w)};
    return bwd_dense(q, k, v, beta, w, o, u, r, lse_w, lse_o, grad_o, du, scale, chunk_size);
  }
  const auto off = host_offsets(*cu_seqlens);
  Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  Tensor dbeta = empty_or(beta), dw = empty_or(w);
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t bos = off[n], len = off[n + 1] - bos;
    if (len == 0) continue;
    auto sl = [&](const Tensor& x) { return x.narrow(1, bos, len); };
    auto [dqn, dkn, dvn, dbn, dwn] =
        bwd_dense(sl(q), sl(k), sl(v), slice_seq(beta, bos, len), slice_seq(w, bos, len), sl(o), sl(u), sl(r),
                  sl(lse_w), sl(lse_o), sl(grad_o), slice_seq(du, bos, len), scale, chunk_size);
    sl(dq).copy_(dqn);
    sl(dk).copy_(dkn);
    sl(dv).copy_(dvn);
    if (present(beta)) sl(dbeta).copy_(dbn);
    if (present(w)) sl(dw).copy_(dwn);
  }
  return {dq, dk, dv, dbeta, dw};
}

}  // namespace linflow::deltaformer
