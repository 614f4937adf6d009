// LION, bidirectional linear attention (ALGORITHMS.md §4), written with ATen ops: device-generic, batched over
// (sequence x head [x chunk]); loops only over chunks (chunked), tokens (recurrent) or packed sequences (varlen).
// All arithmetic in fp32 (fp64 for fp64 inputs). Per sequence and head, with forward / backward log gates gf, gb
// and cF = cumsum(gf), cB = cumsum(gb):
//   M_ij = exp(cF_i - cF_j) (j <= i),  exp(cB_j - cB_i) (j > i)       (exponent always <= 0)
//   P = s ((Q K^T) o M) V'     V' = [V, 1] when normalising (the last column is the denominator), else V
//   o = P[:, :V] / (P[:, V] + eps)   or   o = P
// The three decays and two conventions are all (gf, gb) pairs (gates_of): none = no gates; fixed: gf = gb = log lam;
// selective symmetric: gf = gb = g; "lion_code": gf_t = g_{t-1} (the forward sweep uses the previous token's
// decay), gb = g; g_backward replaces g in gb.
//
// chunked: P = causal(Q, K, V', gf, diagonal) + flip(causal(flip Q, flip K, flip V', shift(flip gb), strict)):
//   two causal chunk-state passes (K x V' states, linear in T); the reversed anti-causal part uses the shifted
//   reversed gates because prod_{t=i+1..j} aB_t reads, in reversed time, as prod_{t'=j'..i'-1}.
// full: the explicit T x T mask. recurrent: two token scans keeping only q_i^T S_i (V' numbers per token).
#include "common/alloc.h"
#include "common/checks.h"
#include "lion/lion.h"

#include <cmath>
#include <limits>
#include <vector>

namespace linflow::lion {
using at::Tensor;

namespace {

Decay parse_decay(const char* op, const std::string& s) {
  if (s == "none") return Decay::none;
  if (s == "fixed") return Decay::fixed;
  if (s == "selective") return Decay::selective;
  TORCH_CHECK(false, op, ": decay must be \"none\", \"fixed\" or \"selective\", got \"", s, "\"");
}

Convention parse_convention(const char* op, const std::string& s) {
  if (s == "symmetric") return Convention::symmetric;
  if (s == "lion_code") return Convention::lion_code;
  TORCH_CHECK(false, op, ": decay_convention must be \"symmetric\" or \"lion_code\", got \"", s, "\"");
}

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

Config check_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
                  const std::optional<Tensor>& g_backward, const std::optional<Tensor>& lam,
                  const std::optional<Tensor>& cu_seqlens, const std::string& decay,
                  const std::string& decay_convention, bool normalize, double eps, double scale,
                  const std::string& mode, int64_t chunk_size) {
  const QKVShape qkv = check_qkv(op, q, k, v);
  const int64_t B = qkv.B, T = qkv.T, H = qkv.H, K = qkv.K, V = qkv.V;
  const at::Device dev = q.device();

  Config c{};
  c.B = B; c.T = T; c.H = H; c.K = K; c.V = V;
  c.decay = parse_decay(op, decay);
  c.convention = parse_convention(op, decay_convention);
  const bool hg = has(g), hgb = has(g_backward), hl = has(lam);
  switch (c.decay) {
    case Decay::none:
      TORCH_CHECK(!hg && !hgb && !hl, op, ": decay=\"none\" takes no g, g_backward or lam, but ",
                  hg ? "g" : hgb ? "g_backward" : "lam", " was given (use decay=\"selective\" for g, \"fixed\" for lam)");
      break;
    case Decay::fixed:
      TORCH_CHECK(hl, op, ": decay=\"fixed\" needs lam [H] (per-head decay in (0, 1))");
      TORCH_CHECK(!hg && !hgb, op, ": decay=\"fixed\" takes lam only, but ", hg ? "g" : "g_backward",
                  " was given (use decay=\"selective\" for per-token gates)");
      break;
    case Decay::selective:
      TORCH_CHECK(hg, op, ": decay=\"selective\" needs g [B, T, H] (log decay <= 0)");
      TORCH_CHECK(!hl, op, ": decay=\"selective\" takes g (and g_backward), but lam was given (lam is for decay=\"fixed\")");
      break;
  }
  check_optional_float_tensor(op, "g", g, {B, T, H}, dev);
  check_optional_float_tensor(op, "g_backward", g_backward, {B, T, H}, dev);
  check_optional_float_tensor(op, "lam", lam, {H}, dev);
  if (hl) {  // a value check on an [H] tensor (one small host sync on CUDA)
    Tensor l = lam->detach().to(at::kCPU, at::kDouble);
    const double lo = l.min().item<double>(), hi = l.max().item<double>();
    TORCH_CHECK(lo > 0.0 && hi < 1.0, op, ": lam must lie in (0, 1) (open interval), got values in [", lo, ", ", hi,
                "]");
  }
  // Log gates must be <= 0 (decays in (0, 1]); checked on CPU tensors only (no device sync on CUDA).
  for (auto [name, t] : {std::pair<const char*, const std::optional<Tensor>*>{"g", &g}, {"g_backward", &g_backward}}) {
    if (has(*t) && (*t)->is_cpu() && (*t)->numel() > 0) {
      const double mx = (*t)->detach().max().item<double>();
      TORCH_CHECK(!(mx > 0.0), op, ": ", name, " is a log decay and must be <= 0 (decay in (0, 1]), got max ", mx);
    }
  }
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(chunk_size == 16 || chunk_size == 32 || chunk_size == 64 || chunk_size == 128, op,
              ": chunk_size must be 16, 32, 64 or 128, got ", chunk_size);
  c.normalize = normalize;
  c.eps = eps;
  c.scale = scale;
  c.chunk_size = chunk_size;
  if (mode == "chunked") c.mode = Mode::chunked;
  else if (mode == "full") c.mode = Mode::full;
  else if (mode == "recurrent") c.mode = Mode::recurrent;
  else if (mode == "auto") c.mode = T <= chunk_size ? Mode::full : Mode::chunked;
  else TORCH_CHECK(false, op, ": mode must be \"auto\", \"chunked\", \"full\" or \"recurrent\", got \"", mode, "\"");
  c.N = check_cu_seqlens(op, cu_seqlens, B, T, dev);
  return c;
}

namespace {

at::ScalarType acc_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// [B, T, H, D] -> [B*H, T, D] in `acc`;  [B, T, H] -> [B*H, T]
Tensor to_bh(const Tensor& x, at::ScalarType acc) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2);
  if (x.dim() == 3) return x.permute({0, 2, 1}).to(acc).reshape({B * H, T});
  return x.permute({0, 2, 1, 3}).to(acc).reshape({B * H, T, x.size(3)});
}

// [B*H, T, D] -> [B, T, H, D];  [B*H, T] -> [B, T, H]
Tensor from_bh(const Tensor& x, int64_t B, int64_t H, at::ScalarType dtype) {
  const int64_t T = x.size(1);
  if (x.dim() == 2) return x.view({B, H, T}).permute({0, 2, 1}).to(dtype).contiguous();
  return x.view({B, H, T, x.size(2)}).permute({0, 2, 1, 3}).to(dtype).contiguous();
}

// x_t -> x_{t-1} along dim 1 (x_{-1} = 0), and its adjoint x_t -> x_{t+1} (x_T = 0).
Tensor shift_right(const Tensor& x) {
  return at::cat({at::zeros_like(x.narrow(1, 0, 1)), x.narrow(1, 0, x.size(1) - 1)}, 1);
}
Tensor shift_left(const Tensor& x) {
  return at::cat({x.narrow(1, 1, x.size(1) - 1), at::zeros_like(x.narrow(1, 0, 1))}, 1);
}

Tensor rev_cumsum(const Tensor& x, int64_t dim) { return x.flip(dim).cumsum(dim).flip(dim); }

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// ------------------------------------------------------------------------------------------------------------
// Causal masked linear attention in chunk form, the building block of `chunked`:
//   P_i = sum_{j <= i (j < i if strict)} exp(c_i - c_j) (q_i . k_j) v_j,   c = cumsum(g)   (g undefined: c = 0)
// Per chunk, gamma = within-chunk cumsum(g), S = state at the chunk start, E[r,u] = exp(gamma_r - gamma_u) masked:
//   P = diag(e^gamma) Q S + ((Q K^T) o E) V,   S' = e^gamma_C S + K^T diag(e^(gamma_C - gamma)) V

// [BH, L, D] -> [BH, NC, C, D] (or [BH, L] -> [BH, NC, C]), zero-padded: a padded token has k = v = g = 0.
Tensor to_chunks(const Tensor& x, int64_t C) {
  const int64_t BH = x.size(0), L = x.size(1), NC = (L + C - 1) / C;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[1] = NC * C;
  Tensor padded = at::zeros(sizes, x.options());
  padded.narrow(1, 0, L).copy_(x);
  std::vector<int64_t> view = {BH, NC, C};
  if (x.dim() == 3) view.push_back(x.size(2));
  return padded.view(view);
}

Tensor from_chunks(const Tensor& x, int64_t L) {
  std::vector<int64_t> view = {x.size(0), x.size(1) * x.size(2)};
  if (x.dim() == 4) view.push_back(x.size(3));
  return x.reshape(view).narrow(1, 0, L);
}

struct CausalChunks {
  Tensor q, k, v;     // [BH, NC, C, K|V]
  Tensor gam;         // [BH, NC, C] within-chunk cumulative log gate (undefined: no decay)
  Tensor E;           // [BH, NC, C, C] decay mask (tril ones when ungated)
  Tensor qg, kd;      // diag(e^gamma) Q, diag(e^(gamma_C - gamma)) K
  Tensor decay_last;  // e^gamma_C [BH, NC]
  Tensor qk, Z;       // Q K^T, (Q K^T) o E
  Tensor states;      // [BH, NC, K, V] state at each chunk start
};

CausalChunks causal_chunks(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, bool strict, int64_t C) {
  CausalChunks f;
  f.q = to_chunks(q, C);
  f.k = to_chunks(k, C);
  f.v = to_chunks(v, C);
  const auto opts = f.q.options();
  const int64_t BH = f.q.size(0), NC = f.q.size(1);
  Tensor keep = at::ones({C, C}, opts.dtype(at::kBool)).tril(strict ? -1 : 0);
  if (g.defined()) {
    f.gam = to_chunks(g, C).cumsum(-1);
    Tensor last = f.gam.narrow(-1, C - 1, 1);
    // mask before exp: kept exponents are <= 0, dropped ones give exp(-inf) = 0
    f.E = (f.gam.unsqueeze(-1) - f.gam.unsqueeze(-2)).masked_fill(keep.logical_not(), kNegInf).exp();
    f.decay_last = last.squeeze(-1).exp();
    f.qg = f.q * f.gam.exp().unsqueeze(-1);
    f.kd = f.k * (last - f.gam).exp().unsqueeze(-1);
  } else {
    f.E = keep.to(opts.dtype()).expand({BH, NC, C, C});
    f.decay_last = at::ones({BH, NC}, opts);
    f.qg = f.q;
    f.kd = f.k;
  }
  f.qk = at::matmul(f.q, f.k.transpose(-1, -2));
  f.Z = f.qk * f.E;
  // state pass: the per-chunk contributions are one batched GEMM, the recurrence a short loop over chunks
  Tensor contrib = at::matmul(f.kd.transpose(-1, -2), f.v);  // [BH, NC, K, V]
  f.states = at::empty_like(contrib);
  Tensor S = at::zeros_like(contrib.select(1, 0));
  for (int64_t c = 0; c < NC; ++c) {
    f.states.select(1, c).copy_(S);
    S = S * f.decay_last.select(1, c).view({-1, 1, 1}) + contrib.select(1, c);
  }
  return f;
}

Tensor causal_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, bool strict, int64_t C) {
  CausalChunks f = causal_chunks(q, k, v, g, strict, C);
  return from_chunks(at::matmul(f.qg, f.states) + at::matmul(f.Z, f.v), q.size(1));
}

// Gradients (dq, dk, dv, dg) of <P, dP> for the causal form above; dg undefined when g is.
std::tuple<Tensor, Tensor, Tensor, Tensor> causal_bwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                      const Tensor& g, bool strict, int64_t C, const Tensor& dP_) {
  CausalChunks f = causal_chunks(q, k, v, g, strict, C);
  const int64_t L = q.size(1), NC = f.q.size(1);
  Tensor dP = to_chunks(dP_, C);
  // reverse pass: dS_end[c] = gradient w.r.t. the state after chunk c
  Tensor qdp = at::matmul(f.qg.transpose(-1, -2), dP);  // [BH, NC, K, V]
  Tensor dS_end = at::empty_like(qdp);
  Tensor dS = at::zeros_like(qdp.select(1, 0));
  for (int64_t c = NC - 1; c >= 0; --c) {
    dS_end.select(1, c).copy_(dS);
    dS = dS * f.decay_last.select(1, c).view({-1, 1, 1}) + qdp.select(1, c);
  }
  Tensor dZ = at::matmul(dP, f.v.transpose(-1, -2));  // d(Q K^T o E), unmasked: E / Z are 0 off the mask
  Tensor dQK = dZ * f.E;
  Tensor dv = at::matmul(f.Z.transpose(-1, -2), dP) + at::matmul(f.kd, dS_end);
  Tensor dQg = at::matmul(dP, f.states.transpose(-1, -2));
  Tensor dKd = at::matmul(f.v, dS_end.transpose(-1, -2));
  Tensor dq = at::matmul(dQK, f.k), dk = at::matmul(dQK.transpose(-1, -2), f.q);
  Tensor dg;
  if (g.defined()) {
    dq += dQg * f.gam.exp().unsqueeze(-1);
    Tensor last = f.gam.narrow(-1, C - 1, 1);
    dk += dKd * (last - f.gam).exp().unsqueeze(-1);
    Tensor hz = dZ * f.Z, hd = (dKd * f.kd).sum(-1);
    Tensor dgam = (dQg * f.qg).sum(-1) + hz.sum(-1) - hz.sum(-2) - hd;
    Tensor dlast = hd.sum(-1) + f.decay_last * (f.states * dS_end).sum({-2, -1});
    dgam.select(-1, C - 1).add_(dlast);
    dg = from_chunks(rev_cumsum(dgam, -1), L);
  } else {
    dq += dQg;
    dk += dKd;
  }
  return {from_chunks(dq, L), from_chunks(dk, L), from_chunks(dv, L), dg};
}

// ------------------------------------------------------------------------------------------------------------
// The three forms of P = s ((Q K^T) o M) V' on [BH, L, *] tensors (one sequence per row, or a dense batch).

// reversed-time gates of the anti-causal half: gbr_t' = gb_{L - t'} (t' >= 1), gbr_0 = 0
Tensor reversed_gates(const Tensor& gb) { return gb.defined() ? shift_right(gb.flip(1)) : gb; }

Tensor chunked_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& gf, const Tensor& gb, double s,
                   int64_t C) {
  Tensor fwd = causal_fwd(q, k, v, gf, /*strict=*/false, C);
  Tensor bwd = causal_fwd(q.flip(1), k.flip(1), v.flip(1), reversed_gates(gb), /*strict=*/true, C).flip(1);
  return (fwd + bwd) * s;
}

using CoreGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;  // dq, dk, dv, dgf, dgb

CoreGrads chunked_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& gf, const Tensor& gb, double s,
                      int64_t C, const Tensor& dP) {
  Tensor dPs = dP * s;
  auto [dq, dk, dv, dgf] = causal_bwd(q, k, v, gf, false, C, dPs);
  auto [rq, rk, rv, rgb] = causal_bwd(q.flip(1), k.flip(1), v.flip(1), reversed_gates(gb), true, C, dPs.flip(1));
  Tensor dgb = gb.defined() ? shift_left(rgb).flip(1) : Tensor();
  return {dq + rq.flip(1), dk + rk.flip(1), dv + rv.flip(1), dgf, dgb};
}

// The explicit L x L mask: log M_ij = cF_i - cF_j (j <= i), cB_j - cB_i (j > i); selected before exp. The
// cumulative sums run over the whole sequence, so they and their differences are taken in fp64 (in fp32 a
// difference of two sums near -1e4 would lose ~1e-3 of the exponent).
Tensor full_mask(const Tensor& gf, const Tensor& gb, int64_t L, const at::TensorOptions& opts) {
  if (!gf.defined()) return at::ones({L, L}, opts);
  Tensor lower = at::ones({L, L}, opts.dtype(at::kBool)).tril();
  Tensor cF = gf.to(at::kDouble).cumsum(1), cB = gb.to(at::kDouble).cumsum(1);
  Tensor logF = cF.unsqueeze(-1) - cF.unsqueeze(-2), logB = cB.unsqueeze(-2) - cB.unsqueeze(-1);
  return at::where(lower, logF, logB).to(opts.dtype()).exp();
}

Tensor full_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& gf, const Tensor& gb, double s) {
  Tensor A = at::matmul(q, k.transpose(-1, -2)) * full_mask(gf, gb, q.size(1), q.options()) * s;
  return at::matmul(A, v);
}

CoreGrads full_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& gf, const Tensor& gb, double s,
                   const Tensor& dP) {
  Tensor M = full_mask(gf, gb, q.size(1), q.options());
  Tensor A = at::matmul(q, k.transpose(-1, -2)) * M * s;
  Tensor dA = at::matmul(dP, v.transpose(-1, -2));
  Tensor dv = at::matmul(A.transpose(-1, -2), dP);
  Tensor G = dA * M * s;
  Tensor dq = at::matmul(G, k), dk = at::matmul(G.transpose(-1, -2), q);
  Tensor dgf, dgb;
  if (gf.defined()) {
    Tensor h = dA * A, hl = h.tril(), hu = h.triu(1);
    dgf = rev_cumsum(hl.sum(-1) - hl.sum(-2), 1);
    dgb = rev_cumsum(hu.sum(-2) - hu.sum(-1), 1);
  }
  return {dq, dk, dv, dgf, dgb};
}

// Two token scans; only q_i^T S_i (V' numbers per token and direction) is kept:
//   S^F_i = aF_i S^F_{i-1} + k_i v_i^T,   S^B_i = aB_{i+1} S^B_{i+1} + k_i v_i^T,   P_i = s (yF_i + yB_i - (q_i.k_i) v_i)
Tensor recurrent_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& gf, const Tensor& gb, double s) {
  const int64_t BH = q.size(0), L = q.size(1), K = q.size(2), Vp = v.size(2);
  Tensor y = at::empty({BH, L, Vp}, q.options());
  Tensor af = gf.defined() ? gf.exp() : Tensor(), ab = gb.defined() ? gb.exp() : Tensor();
  Tensor S = at::zeros({BH, K, Vp}, q.options());
  for (int64_t t = 0; t < L; ++t) {
    if (af.defined()) S.mul_(af.select(1, t).view({BH, 1, 1}));
    S.baddbmm_(k.select(1, t).unsqueeze(2), v.select(1, t).unsqueeze(1));
    y.select(1, t).copy_(at::bmm(q.select(1, t).unsqueeze(1), S).squeeze(1));
  }
  S.zero_();
  for (int64_t t = L - 1; t >= 0; --t) {
    if (ab.defined() && t + 1 < L) S.mul_(ab.select(1, t + 1).view({BH, 1, 1}));
    S.baddbmm_(k.select(1, t).unsqueeze(2), v.select(1, t).unsqueeze(1));
    y.select(1, t).add_(at::bmm(q.select(1, t).unsqueeze(1), S).squeeze(1));
  }
  y.sub_((q * k).sum(-1, /*keepdim=*/true) * v);  // the diagonal, counted by both scans
  return y.mul_(s);
}

// ------------------------------------------------------------------------------------------------------------
// Gates, normalisation and the per-slice drivers.

struct Gates {
  Tensor gf, gb;  // [BH, L] forward / backward log gates (undefined: no decay)
};

Gates gates_of(const Config& c, const std::optional<Tensor>& g, const std::optional<Tensor>& gbk,
               const std::optional<Tensor>& lam, int64_t B, int64_t L, at::ScalarType acc) {
  Gates r;
  if (c.decay == Decay::fixed) {
    r.gf = lam->to(acc).log().view({1, c.H, 1}).expand({B, c.H, L}).reshape({B * c.H, L});
    r.gb = r.gf;
  } else if (c.decay == Decay::selective) {
    Tensor gh = to_bh(*g, acc);
    r.gf = c.convention == Convention::lion_code ? shift_right(gh) : gh;
    r.gb = has(gbk) ? to_bh(*gbk, acc) : gh;
  }
  return r;
}

// V' = [V, 1] when normalising
Tensor values_of(const Config& c, const Tensor& v) {
  return c.normalize ? at::cat({v, at::ones_like(v.narrow(-1, 0, 1))}, -1) : v;
}

Tensor core_fwd(const Config& c, const Tensor& q, const Tensor& k, const Tensor& v, const Gates& gt) {
  switch (c.mode) {
    case Mode::full: return full_fwd(q, k, v, gt.gf, gt.gb, c.scale);
    case Mode::recurrent: return recurrent_fwd(q, k, v, gt.gf, gt.gb, c.scale);
    default: return chunked_fwd(q, k, v, gt.gf, gt.gb, c.scale, c.chunk_size);
  }
}

Tensor normalized(const Config& c, const Tensor& P) {
  if (!c.normalize) return P;
  return P.narrow(-1, 0, c.V) / (P.narrow(-1, c.V, 1) + c.eps);
}

// Dense inputs [B, L, H, *] (one packed sequence when B = 1) -> o [B, L, H, V] in q's dtype.
Tensor fwd_dense(const Config& c, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
                 const std::optional<Tensor>& gbk, const std::optional<Tensor>& lam) {
  const auto acc = acc_type(q);
  const int64_t B = q.size(0), L = q.size(1);
  Gates gt = gates_of(c, g, gbk, lam, B, L, acc);
  Tensor P = core_fwd(c, to_bh(q, acc), to_bh(k, acc), values_of(c, to_bh(v, acc)), gt);
  return from_bh(normalized(c, P), B, c.H, q.scalar_type());
}

struct SliceGrads {
  Tensor dq, dk, dv;  // [B, L, H, *] in the input dtypes
  Tensor dg, dgb;     // [B, L, H] in acc (undefined when absent)
  Tensor dloglam;     // [H] in acc: d/d(log lam), summed over the slice
};

SliceGrads bwd_dense(const Config& c, const Tensor& q, const Tensor& k, const Tensor& v,
                     const std::optional<Tensor>& g, const std::optional<Tensor>& gbk, const std::optional<Tensor>& lam,
                     const Tensor& grad_o) {
  const auto acc = acc_type(q);
  const int64_t B = q.size(0), L = q.size(1), H = c.H;
  Gates gt = gates_of(c, g, gbk, lam, B, L, acc);
  Tensor qb = to_bh(q, acc), kb = to_bh(k, acc), vb = values_of(c, to_bh(v, acc));
  Tensor dO = to_bh(grad_o, acc);
  Tensor dP = dO;
  if (c.normalize) {  // o = num / (den + eps): d num = dO / (den + eps), d den = -(dO . o) / (den + eps)
    Tensor P = core_fwd(c, qb, kb, vb, gt);
    Tensor inv = (P.narrow(-1, c.V, 1) + c.eps).reciprocal();
    Tensor o = P.narrow(-1, 0, c.V) * inv;
    dP = at::cat({dO * inv, -(dO * o).sum(-1, /*keepdim=*/true) * inv}, -1);
  }
  auto [dq, dk, dv, dgf, dgb] = c.mode == Mode::full ? full_bwd(qb, kb, vb, gt.gf, gt.gb, c.scale, dP)
                                                     : chunked_bwd(qb, kb, vb, gt.gf, gt.gb, c.scale, c.chunk_size, dP);
  SliceGrads r;
  r.dq = from_bh(dq, B, H, q.scalar_type());
  r.dk = from_bh(dk, B, H, k.scalar_type());
  r.dv = from_bh(c.normalize ? dv.narrow(-1, 0, c.V) : dv, B, H, v.scalar_type());
  if (c.decay == Decay::fixed) {
    r.dloglam = (dgf + dgb).view({B, H, L}).sum(at::IntArrayRef{0, 2});
  } else if (c.decay == Decay::selective) {
    Tensor dgh = c.convention == Convention::lion_code ? shift_left(dgf) : dgf;
    if (has(gbk)) {
      r.dgb = from_bh(dgb, B, H, acc);
    } else {
      dgh = dgh + dgb;
    }
    r.dg = from_bh(dgh, B, H, acc);
  }
  return r;
}

std::vector<int64_t> host_offsets(const Tensor& cu) {
  Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

std::optional<Tensor> slice_seq(const std::optional<Tensor>& x, int64_t bos, int64_t len) {
  if (!has(x)) return x;
  return x->narrow(1, bos, len);
}

}  // namespace

Tensor fwd_aten(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
                const std::optional<Tensor>& g_backward, const std::optional<Tensor>& lam,
                const std::optional<Tensor>& cu_seqlens, c10::string_view decay, c10::string_view decay_convention,
                bool normalize, double eps, double scale, c10::string_view mode, int64_t chunk_size) {
  const Config c = check_args("lion_fwd", q, k, v, g, g_backward, lam, cu_seqlens, std::string(decay),
                              std::string(decay_convention), normalize, eps, scale, std::string(mode), chunk_size);
  if (c.B * c.T == 0) return at::zeros({c.B, c.T, c.H, c.V}, q.options());
  if (!has(cu_seqlens)) return fwd_dense(c, q, k, v, g, g_backward, lam);
  // Variable length: each sequence runs alone.
  const auto off = host_offsets(*cu_seqlens);
  Tensor o = new_output({1, c.T, c.H, c.V}, q.options());
  for (int64_t i = 0; i < c.N; ++i) {
    const int64_t bos = off[i], L = off[i + 1] - off[i];
    if (L == 0) continue;
    o.narrow(1, bos, L).copy_(fwd_dense(c, q.narrow(1, bos, L), k.narrow(1, bos, L), v.narrow(1, bos, L),
                                        slice_seq(g, bos, L), slice_seq(g_backward, bos, L), lam));
  }
  return o;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd_aten(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
    const std::optional<Tensor>& g_backward, const std::optional<Tensor>& lam, const std::optional<Tensor>& cu_seqlens,
    const Tensor& grad_o, c10::string_view decay, c10::string_view decay_convention, bool normalize, double eps,
    double scale, c10::string_view mode, int64_t chunk_size) {
  const Config c = check_args("lion_bwd", q, k, v, g, g_backward, lam, cu_seqlens, std::string(decay),
                              std::string(decay_convention), normalize, eps, scale, std::string(mode), chunk_size);
  check_float_tensor("lion_bwd", "grad_o", grad_o, {c.B, c.T, c.H, c.V}, q.device());
  TORCH_CHECK(c.mode != Mode::recurrent, "lion_bwd: mode=\"recurrent\" is the forward-only inference form (no ",
              "gradients); train with mode=\"chunked\" (or \"full\" for short sequences)");
  const auto acc = acc_type(q);
  const bool hg = has(g), hgb = has(g_backward), hl = has(lam);
  Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  Tensor dg = hg ? at::zeros(g->sizes(), q.options().dtype(acc)) : Tensor();
  Tensor dgb = hgb ? at::zeros(g_backward->sizes(), q.options().dtype(acc)) : Tensor();
  Tensor dloglam = hl ? at::zeros({c.H}, q.options().dtype(acc)) : Tensor();
  auto run = [&](int64_t bos, int64_t L) {
    SliceGrads r = bwd_dense(c, q.narrow(1, bos, L), k.narrow(1, bos, L), v.narrow(1, bos, L), slice_seq(g, bos, L),
                             slice_seq(g_backward, bos, L), lam, grad_o.narrow(1, bos, L));
    dq.narrow(1, bos, L).copy_(r.dq);
    dk.narrow(1, bos, L).copy_(r.dk);
    dv.narrow(1, bos, L).copy_(r.dv);
    if (hg) dg.narrow(1, bos, L).copy_(r.dg);
    if (hgb) dgb.narrow(1, bos, L).copy_(r.dgb);
    if (hl) dloglam += r.dloglam;
  };
  if (c.B * c.T > 0) {
    if (!has(cu_seqlens)) {
      run(0, c.T);
    } else {
      const auto off = host_offsets(*cu_seqlens);
      for (int64_t i = 0; i < c.N; ++i)
        if (off[i + 1] > off[i]) run(off[i], off[i + 1] - off[i]);
    }
  }
  auto empty = [&] { return at::empty({0}, q.options()); };  // one per output: outputs must not alias
  return {dq, dk, dv, hg ? dg.to(g->scalar_type()) : empty(), hgb ? dgb.to(g_backward->scalar_type()) : empty(),
          hl ? (dloglam / lam->to(acc)).to(lam->scalar_type()) : empty()};
}

}  // namespace linflow::lion
