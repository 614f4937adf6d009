// Delta rule, chunk (WY / UT-transform) form written with ATen ops: device-generic, batched over
// (sequence, head, chunk) for everything that does not depend on the state, and a loop over chunks for the
// state pass (fwd) and the state-gradient pass (bwd). Math: ALGORITHMS.md §1. All arithmetic in fp32
// (fp64 for fp64 inputs). Per chunk, with gamma = within-chunk cumsum(g), E[r,u] = exp(gamma_r - gamma_u) (r >= u):
//   A = tril_-1(diag(beta) (K K^T o E)),  Tm = (I + A)^-1,  W = Tm diag(beta e^gamma) K,  U = Tm diag(beta) V
//   Vn = U - W S,  O = s (diag(e^gamma) Q S + (Q K^T o E) Vn),  S' = e^gamma_C S + K^T diag(e^(gamma_C - gamma)) Vn
// Shared with the rank-R (flow) family (ALGORITHMS.md §2), which runs this form on its interleaved length-T·R
// sequence: ChunkOpts::block consecutive rows see one state (A is zero inside a block; 1 = the delta rule), and
// the state pass is either the loop over chunks or a log-depth prefix scan of the chunks' affine maps (P, Q).
#include "common/checks.h"
#include "delta_rule/delta_rule.h"

#include <vector>

namespace linflow::delta_rule {
using at::Tensor;

Shapes check_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                  const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                  const std::optional<Tensor>& cu_seqlens, int64_t chunk_size) {
  const QKVShape qkv = check_qkv(op, q, k, v);
  const int64_t B = qkv.B, T = qkv.T, H = qkv.H, K = qkv.K, V = qkv.V;
  const at::Device dev = q.device();
  check_float_tensor(op, "beta", beta, {B, T, H}, dev);
  check_optional_float_tensor(op, "g", g, {B, T, H}, dev);
  TORCH_CHECK(chunk_size == 16 || chunk_size == 32 || chunk_size == 64, op, ": chunk_size must be 16, 32 or 64, got ",
              chunk_size);
  const int64_t N = check_cu_seqlens(op, cu_seqlens, B, T, dev);
  check_optional_float_tensor(op, "initial_state", initial_state, {N, H, K, V}, dev);
  return {B, T, H, K, V, N};
}

namespace {

at::ScalarType acc_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// [B, T, H, ...] -> [B*H, NC, C, ...] in `acc`, zero-padded along T. Zero padding is exact for the delta rule:
// a padded token has k = v = beta = g = 0, i.e. the identity transition, and its output is dropped.
Tensor to_chunks(const Tensor& x, int64_t C, at::ScalarType acc) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), NC = (T + C - 1) / C;
  std::vector<int64_t> padded_sizes = x.sizes().vec();
  padded_sizes[1] = NC * C;
  Tensor padded = at::zeros(padded_sizes, x.options().dtype(acc));
  padded.narrow(1, 0, T).copy_(x);
  std::vector<int64_t> view = {B, NC, C, H}, perm = {0, 3, 1, 2}, out = {B * H, NC, C};
  for (int64_t d = 3; d < x.dim(); ++d) {
    view.push_back(x.size(d));
    perm.push_back(d + 1);
    out.push_back(x.size(d));
  }
  return padded.view(view).permute(perm).reshape(out);
}

// Inverse of to_chunks for a [B*H, NC, C, D] tensor: -> [B, T, H, D] in `dtype`.
Tensor from_chunks(const Tensor& x, int64_t B, int64_t T, int64_t H, at::ScalarType dtype) {
  const int64_t NC = x.size(1), C = x.size(2), D = x.size(3);
  return x.view({B, H, NC * C, D}).narrow(2, 0, T).permute({0, 2, 1, 3}).to(dtype).contiguous();
}

// [B*H, NC, C] -> [B, T, H]
Tensor from_chunks3(const Tensor& x, int64_t B, int64_t T, int64_t H, at::ScalarType dtype) {
  const int64_t NC = x.size(1), C = x.size(2);
  return x.view({B, H, NC * C}).narrow(2, 0, T).permute({0, 2, 1}).to(dtype).contiguous();
}

// A may be nonzero at (r, u) only when row u lies in an earlier block of `block` rows than row r (block 1: u < r).
Tensor mask_strictly_lower_blocks(const Tensor& x, int64_t block) {
  if (block == 1) return x.tril(-1);
  Tensor blk = at::arange(x.size(-1), x.options().dtype(at::kLong)).div(block, "floor");
  return x.masked_fill(blk.unsqueeze(-1) <= blk.unsqueeze(0), 0);
}

// Everything of a chunk that does not depend on the incoming state. Without q (transitions only) the
// query-side members stay undefined.
struct ChunkForm {
  Tensor q, k, v, beta;  // [BH, NC, C, K|V], [BH, NC, C]
  Tensor gam;            // within-chunk cumulative log decay [BH, NC, C] (undefined: ungated)
  Tensor decay;          // E: exp(gamma_r - gamma_u) on r >= u, else 0 (ones-lower when ungated) [BH, NC, C, C]
  Tensor kk_e;           // (K K^T) o E
  Tensor A;              // tril_-1(diag(beta) kk_e)
  Tensor Tm, W, U;       // (I + A)^-1, W, U
  Tensor kb;             // diag(beta e^gamma) K
  Tensor kd;             // diag(e^(gamma_C - gamma)) K
  Tensor qg;             // diag(e^gamma) Q
  Tensor qk_e;           // (Q K^T) o E
  Tensor decay_last;     // e^gamma_C [BH, NC]
};

ChunkForm chunk_form(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& beta_,
                     const std::optional<Tensor>& g_, int64_t C, int64_t block) {
  const auto acc = acc_type(k_);
  const bool has_q = q_.defined();
  ChunkForm f;
  if (has_q) f.q = to_chunks(q_, C, acc);
  f.k = to_chunks(k_, C, acc);
  f.v = to_chunks(v_, C, acc);
  f.beta = to_chunks(beta_, C, acc);
  const auto opts = f.k.options();
  Tensor lower = at::ones({C, C}, opts.dtype(at::kBool)).tril();
  if (g_.has_value() && g_->defined()) {
    f.gam = to_chunks(*g_, C, acc).cumsum(-1);
    // Mask before exp so the exponent is <= 0 on the kept entries and the dropped ones give exp(-inf) = 0.
    Tensor diff = f.gam.unsqueeze(-1) - f.gam.unsqueeze(-2);
    f.decay = diff.masked_fill(lower.logical_not(), -std::numeric_limits<double>::infinity()).exp();
    Tensor eg = f.gam.exp();
    Tensor last = f.gam.narrow(-1, C - 1, 1);
    f.decay_last = last.squeeze(-1).exp();
    f.kb = f.k * (f.beta * eg).unsqueeze(-1);
    f.kd = f.k * (last - f.gam).exp().unsqueeze(-1);
    if (has_q) f.qg = f.q * eg.unsqueeze(-1);
  } else {
    f.decay = lower.to(opts.dtype()).expand({f.k.size(0), f.k.size(1), C, C});
    f.decay_last = at::ones({f.k.size(0), f.k.size(1)}, opts);
    f.kb = f.k * f.beta.unsqueeze(-1);
    f.kd = f.k;
    f.qg = f.q;
  }
  f.kk_e = at::matmul(f.k, f.k.transpose(-1, -2)) * f.decay;
  f.A = mask_strictly_lower_blocks(f.beta.unsqueeze(-1) * f.kk_e, block);
  Tensor eye = at::eye(C, opts).expand_as(f.A);
  f.Tm = at::linalg_solve_triangular(eye + f.A, eye, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  f.W = at::matmul(f.Tm, f.kb);
  f.U = at::matmul(f.Tm, f.v * f.beta.unsqueeze(-1));
  if (has_q) f.qk_e = at::matmul(f.q, f.k.transpose(-1, -2)) * f.decay;
  return f;
}

// Each chunk's affine state map S_end = P S_start + Q: P = e^gamma_C I - Kd^T W (K x K), Q = Kd^T U (K x V).
std::pair<Tensor, Tensor> chunk_maps(const ChunkForm& f) {
  const int64_t K = f.k.size(-1);
  Tensor kdT = f.kd.transpose(-1, -2);
  Tensor P = f.decay_last.unsqueeze(-1).unsqueeze(-1) * at::eye(K, f.k.options()) - at::matmul(kdT, f.W);
  return {P, at::matmul(kdT, f.U)};
}

// Forward state pass: states at every chunk start [BH, NC, K, V], new values Vn [BH, NC, C, V], final state.
struct StatePass {
  Tensor states, vn, final_state;
};

StatePass state_pass_sequential(const ChunkForm& f, const Tensor& s0) {
  const int64_t NC = f.q.size(1);
  StatePass p;
  p.states = at::empty({f.q.size(0), NC, f.k.size(-1), f.v.size(-1)}, f.q.options());
  p.vn = at::empty_like(f.U);
  Tensor S = s0.clone();
  for (int64_t c = 0; c < NC; ++c) {
    p.states.select(1, c).copy_(S);
    Tensor vn = f.U.select(1, c) - at::bmm(f.W.select(1, c), S);
    p.vn.select(1, c).copy_(vn);
    S = S * f.decay_last.select(1, c).view({-1, 1, 1}) + at::bmm(f.kd.select(1, c).transpose(1, 2), vn);
  }
  p.final_state = S;
  return p;
}

// Same result from the chunks' affine maps: a prefix scan gives every chunk's incoming state at once, then the
// new values of all chunks in one batched product.
StatePass state_pass_scan(const ChunkForm& f, const Tensor& s0) {
  const int64_t NC = f.k.size(1);
  StatePass p;
  if (NC == 0) {
    p.states = at::empty({f.k.size(0), 0, f.k.size(-1), f.v.size(-1)}, f.k.options());
    p.vn = at::empty_like(f.U);
    p.final_state = s0.clone();
    return p;
  }
  auto [P, Q] = chunk_maps(f);
  auto [Pc, Qc] = affine_prefix_scan(P, Q);
  Tensor ends = at::matmul(Pc, s0.unsqueeze(1)) + Qc;  // state at every chunk's end
  p.states = at::cat({s0.unsqueeze(1), ends.narrow(1, 0, NC - 1)}, 1);
  p.vn = f.U - at::matmul(f.W, p.states);
  p.final_state = ends.select(1, NC - 1);
  return p;
}

StatePass state_pass(const ChunkForm& f, const Tensor& s0, bool scan) {
  return scan ? state_pass_scan(f, s0) : state_pass_sequential(f, s0);
}

Tensor initial_state_bh(const std::optional<Tensor>& h0, int64_t BH, int64_t K, int64_t V, const at::TensorOptions& opts) {
  if (h0.has_value() && h0->defined()) return h0->to(opts.dtype()).reshape({BH, K, V});
  return at::zeros({BH, K, V}, opts);
}

std::tuple<Tensor, Tensor> fwd_dense(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                     const std::optional<Tensor>& g, const std::optional<Tensor>& h0, double scale,
                                     const ChunkOpts& opt) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  ChunkForm f = chunk_form(q, k, v, beta, g, opt.C, opt.block);
  StatePass p = state_pass(f, initial_state_bh(h0, B * H, K, V, f.q.options()), opt.scan);
  Tensor o = (at::matmul(f.qg, p.states) + at::matmul(f.qk_e, p.vn)) * scale;
  return {from_chunks(o, B, T, H, q.scalar_type()), p.final_state.view({B, H, K, V})};
}

Grads bwd_dense(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
                const std::optional<Tensor>& h0, const Tensor& grad_o, const std::optional<Tensor>& grad_ht,
                double scale, const ChunkOpts& opt) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3), C = opt.C;
  const bool gated = g.has_value() && g->defined();
  ChunkForm f = chunk_form(q, k, v, beta, g, C, opt.block);
  const auto opts = f.q.options();
  const int64_t BH = B * H, NC = f.q.size(1);
  StatePass p = state_pass(f, initial_state_bh(h0, BH, K, V, opts), opt.scan);
  Tensor dO = to_chunks(grad_o, C, opts.dtype().toScalarType()) * scale;

  // Reverse pass over chunks: dS is the gradient w.r.t. the state at the current chunk's end. Per chunk it is
  // the affine map dS_start = P^T dS_end + (Qg^T - W^T (Q K^T o E)^T) dO, so the scan variant runs the same
  // prefix scan on the chunks in reverse order with P^T.
  Tensor dS = initial_state_bh(grad_ht, BH, K, V, opts).clone();
  Tensor dvn_all, dS_end;
  if (opt.scan && NC > 0) {
    Tensor Pt = chunk_maps(f).first.transpose(-1, -2);
    Tensor Rc = at::matmul(f.qg.transpose(-1, -2), dO) - at::matmul(f.W.transpose(-1, -2), at::matmul(f.qk_e.transpose(-1, -2), dO));
    auto [Pc, Qc] = affine_prefix_scan(Pt.flip(1), Rc.flip(1));
    Tensor starts = (at::matmul(Pc, dS.unsqueeze(1)) + Qc).flip(1);  // gradient at every chunk's start
    dS_end = at::cat({starts.narrow(1, 1, NC - 1), dS.unsqueeze(1)}, 1);
    dS = starts.select(1, 0);
    dvn_all = at::matmul(f.qk_e.transpose(-1, -2), dO) + at::matmul(f.kd, dS_end);
  } else {
    dvn_all = at::empty_like(p.vn);
    dS_end = at::empty_like(p.states);
    for (int64_t c = NC - 1; c >= 0; --c) {
      dS_end.select(1, c).copy_(dS);
      Tensor dvn = at::bmm(f.qk_e.select(1, c).transpose(1, 2), dO.select(1, c)) + at::bmm(f.kd.select(1, c), dS);
      dvn_all.select(1, c).copy_(dvn);
      dS = at::bmm(f.qg.select(1, c).transpose(1, 2), dO.select(1, c)) + dS * f.decay_last.select(1, c).view({-1, 1, 1}) -
           at::bmm(f.W.select(1, c).transpose(1, 2), dvn);
    }
  }

  // Everything else is chunk-parallel.
  Tensor dZ = at::matmul(dO, p.vn.transpose(-1, -2)).tril();  // d((Q K^T) o E)
  Tensor dQK = dZ * f.decay;
  Tensor dQg = at::matmul(dO, p.states.transpose(-1, -2));
  Tensor dq = gated ? dQg * f.gam.exp().unsqueeze(-1) : dQg.clone();
  dq += at::matmul(dQK, f.k);
  Tensor dk = at::matmul(dQK.transpose(-1, -2), f.q);
  Tensor dKd = at::matmul(p.vn, dS_end.transpose(-1, -2));
  dk += gated ? dKd * (f.gam.narrow(-1, C - 1, 1) - f.gam).exp().unsqueeze(-1) : dKd;
  Tensor dW = -at::matmul(dvn_all, p.states.transpose(-1, -2));
  Tensor TmT = f.Tm.transpose(-1, -2);
  Tensor dVb = at::matmul(TmT, dvn_all), dKb = at::matmul(TmT, dW);
  Tensor dv = dVb * f.beta.unsqueeze(-1);
  Tensor dA = -(at::matmul(dVb, f.U.transpose(-1, -2)) + at::matmul(dKb, f.W.transpose(-1, -2)));
  dA = mask_strictly_lower_blocks(dA, opt.block);
  // kb = diag(beta e^gamma) K: dbeta picks up dKb . (e^gamma K), dK picks up diag(beta e^gamma) dKb.
  Tensor eg = gated ? f.gam.exp() : at::ones_like(f.beta);
  Tensor dbeta = (dVb * f.v).sum(-1) + (dKb * f.k).sum(-1) * eg + (dA * f.kk_e).sum(-1);
  dk += dKb * (f.beta * eg).unsqueeze(-1);
  Tensor G = dA * f.beta.unsqueeze(-1) * f.decay;
  dk += at::matmul(G, f.k) + at::matmul(G.transpose(-1, -2), f.k);

  Tensor dg;
  if (gated) {
    Tensor hz = dZ * f.qk_e, ha = dA * f.A, hd = (dKd * f.kd).sum(-1);
    Tensor dgam = (dQg * f.qg).sum(-1) + hz.sum(-1) - hz.sum(-2) + ha.sum(-1) - ha.sum(-2) + (dKb * f.kb).sum(-1) - hd;
    Tensor dlast = hd.sum(-1) + f.decay_last * (p.states * dS_end).sum({-2, -1});
    dgam.select(-1, C - 1).add_(dlast);
    dg = from_chunks3(dgam.flip(-1).cumsum(-1).flip(-1), B, T, H, g->scalar_type());
  }
  Tensor dh0;
  if (h0.has_value() && h0->defined()) dh0 = dS.view({B, H, K, V}).to(h0->scalar_type());
  return {from_chunks(dq, B, T, H, q.scalar_type()),
          from_chunks(dk, B, T, H, k.scalar_type()),
          from_chunks(dv, B, T, H, v.scalar_type()),
          from_chunks3(dbeta, B, T, H, beta.scalar_type()),
          gated ? dg : at::empty({0}, q.options()),
          dh0.defined() ? dh0 : at::empty({0}, q.options())};
}

std::vector<int64_t> host_offsets(const Tensor& cu) {
  Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

std::optional<Tensor> slice_seq(const std::optional<Tensor>& x, int64_t bos, int64_t eos) {
  if (!x.has_value() || !x->defined()) return x;
  return x->narrow(1, bos, eos - bos);
}

std::optional<Tensor> slice_state(const std::optional<Tensor>& x, int64_t i) {
  if (!x.has_value() || !x->defined()) return x;
  return x->narrow(0, i, 1);
}

}  // namespace

std::pair<Tensor, Tensor> affine_prefix_scan(Tensor P, Tensor Q) {
  // Hillis-Steele: after the round with offset d, entry c holds the composition of entries max(0, c-2d+1)..c.
  const int64_t n = P.size(1);
  for (int64_t d = 1; d < n; d *= 2) {
    Tensor later = P.narrow(1, d, n - d);
    Tensor P_next = at::cat({P.narrow(1, 0, d), at::matmul(later, P.narrow(1, 0, n - d))}, 1);
    Tensor Q_next = at::cat({Q.narrow(1, 0, d), at::matmul(later, Q.narrow(1, 0, n - d)) + Q.narrow(1, d, n - d)}, 1);
    P = P_next;
    Q = Q_next;
  }
  return {P, Q};
}

std::pair<Tensor, Tensor> chunk_transitions(const Tensor& k, const Tensor& v, const Tensor& beta,
                                            const std::optional<Tensor>& g, int64_t C, int64_t block) {
  const int64_t B = k.size(0), H = k.size(2), K = k.size(3), V = v.size(3);
  auto [P, Q] = chunk_maps(chunk_form(Tensor(), k, v, beta, g, C, block));
  const int64_t NC = P.size(1);
  return {P.view({B, H, NC, K, K}).permute({0, 2, 1, 3, 4}), Q.view({B, H, NC, K, V}).permute({0, 2, 1, 3, 4})};
}

std::tuple<Tensor, Tensor> fwd_chunked(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                       const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                                       const std::optional<Tensor>& cu_seqlens, double scale, bool output_final_state,
                                       const ChunkOpts& opt) {
  const int64_t T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  const int64_t N = cu_seqlens.has_value() && cu_seqlens->defined() ? cu_seqlens->size(0) - 1 : q.size(0);
  const auto state_dtype = acc_type(q);
  if (!cu_seqlens.has_value() || !cu_seqlens->defined()) {
    auto [o, ht] = fwd_dense(q, k, v, beta, g, initial_state, scale, opt);
    return {o, output_final_state ? ht.to(state_dtype) : at::empty({0}, q.options().dtype(state_dtype))};
  }
  // Variable length: each sequence runs alone (the CUDA kernels do this in one launch).
  const auto off = host_offsets(*cu_seqlens);
  Tensor o = at::empty({1, T, H, V}, q.options());
  Tensor ht = at::zeros({N, H, K, V}, q.options().dtype(state_dtype));
  for (int64_t i = 0; i < N; ++i) {
    const int64_t bos = off[i], eos = off[i + 1];
    if (eos == bos) {
      if (initial_state.has_value() && initial_state->defined()) ht.select(0, i).copy_(initial_state->select(0, i));
      continue;
    }
    auto [oi, hi] = fwd_dense(q.narrow(1, bos, eos - bos), k.narrow(1, bos, eos - bos), v.narrow(1, bos, eos - bos),
                              beta.narrow(1, bos, eos - bos), slice_seq(g, bos, eos), slice_state(initial_state, i),
                              scale, opt);
    o.narrow(1, bos, eos - bos).copy_(oi);
    ht.select(0, i).copy_(hi.select(0, 0));
  }
  return {o, output_final_state ? ht : at::empty({0}, q.options().dtype(state_dtype))};
}

Grads bwd_chunked(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
                  const std::optional<Tensor>& initial_state, const std::optional<Tensor>& cu_seqlens,
                  const Tensor& grad_o, const std::optional<Tensor>& dht, double scale, const ChunkOpts& opt) {
  if (!cu_seqlens.has_value() || !cu_seqlens->defined())
    return bwd_dense(q, k, v, beta, g, initial_state, grad_o, dht, scale, opt);
  const int64_t N = cu_seqlens->size(0) - 1;

  const bool gated = g.has_value() && g->defined(), has_h0 = initial_state.has_value() && initial_state->defined();
  const auto off = host_offsets(*cu_seqlens);
  Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v), db = at::zeros_like(beta);
  Tensor dg = gated ? at::zeros_like(*g) : at::empty({0}, q.options());
  Tensor dh0 = has_h0 ? at::zeros_like(*initial_state) : at::empty({0}, q.options());
  for (int64_t i = 0; i < N; ++i) {
    const int64_t bos = off[i], eos = off[i + 1], L = eos - bos;
    if (L == 0) {
      if (has_h0 && dht.has_value()) dh0.select(0, i).copy_(dht->select(0, i));
      continue;
    }
    auto [dqi, dki, dvi, dbi, dgi, dh0i] =
        bwd_dense(q.narrow(1, bos, L), k.narrow(1, bos, L), v.narrow(1, bos, L), beta.narrow(1, bos, L),
                  slice_seq(g, bos, eos), slice_state(initial_state, i), grad_o.narrow(1, bos, L),
                  slice_state(dht, i), scale, opt);
    dq.narrow(1, bos, L).copy_(dqi);
    dk.narrow(1, bos, L).copy_(dki);
    dv.narrow(1, bos, L).copy_(dvi);
    db.narrow(1, bos, L).copy_(dbi);
    if (gated) dg.narrow(1, bos, L).copy_(dgi);
    if (has_h0) dh0.select(0, i).copy_(dh0i.select(0, 0));
  }
  return {dq, dk, dv, db, dg, dh0};
}

std::tuple<Tensor, Tensor> fwd_aten(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                    const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                                    const std::optional<Tensor>& cu_seqlens, double scale, bool output_final_state,
                                    int64_t chunk_size) {
  check_args("delta_rule_fwd", q, k, v, beta, g, initial_state, cu_seqlens, chunk_size);
  return fwd_chunked(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, {chunk_size});
}

Grads bwd_aten(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
               const std::optional<Tensor>& initial_state, const std::optional<Tensor>& cu_seqlens,
               const Tensor& grad_o, const std::optional<Tensor>& grad_final_state, double scale, int64_t chunk_size) {
  const Shapes s = check_args("delta_rule_bwd", q, k, v, beta, g, initial_state, cu_seqlens, chunk_size);
  check_float_tensor("delta_rule_bwd", "grad_o", grad_o, {s.B, s.T, s.H, s.V}, q.device());
  std::optional<Tensor> dht = grad_final_state;
  if (dht.has_value() && dht->defined() && dht->numel() == 0) dht.reset();
  check_optional_float_tensor("delta_rule_bwd", "grad_final_state", dht, {s.N, s.H, s.K, s.V}, q.device());
  return bwd_chunked(q, k, v, beta, g, initial_state, cu_seqlens, grad_o, dht, scale, {chunk_size});
}

}  // namespace linflow::delta_rule
