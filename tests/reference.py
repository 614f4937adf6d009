r"""Float64 token-by-token recurrences: the oracle every kernel test compares against (ALGORITHMS.md §1).

No kernel code is reused here: only the recurrence, written with plain differentiable torch ops (no in-place
writes), so gradients of every input can be taken through it with ``torch.autograd``.

    a_t = exp(g_t)                                   (g = None: a_t = 1)
    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T
    o_t = scale * S_t^T q_t
"""
from __future__ import annotations

import torch


def l2norm_ref(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (fla's convention)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def delta_rule_recurrence(q, k, v, beta, g=None, scale=1.0, initial_state=None, dtype=torch.float64):
    """The recurrence for dense inputs ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, g [B, T, H]``,
    ``initial_state [B, H, K, V]``; every op runs in ``dtype``. Returns ``(o [B, T, H, V], S_T [B, H, K, V])``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    S = initial_state.to(dtype) if initial_state is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(dtype).exp()[..., None, None]
        kt = k[:, t]
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt)  # v_t - a_t S_{t-1}^T k_t
        S = S + beta[:, t, :, None, None] * kt[..., :, None] * err[..., None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o, S


def delta_rule_ref(q, k, v, beta, g=None, scale=None, initial_state=None, cu_seqlens=None, use_qk_l2norm=False,
                   dtype=torch.float64):
    """Reference for ``linflow.delta_rule`` (same signature and layout), computed in ``dtype`` (float64 unless a
    test asks for the same math at lower precision). With ``cu_seqlens`` (B = 1) every sequence runs alone, with
    ``initial_state[n]``. Returns ``(o, final_state)``; ``final_state`` is ``[N, H, K, V]``."""
    if use_qk_l2norm:
        q, k = l2norm_ref(q.to(dtype)), l2norm_ref(k.to(dtype))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if cu_seqlens is None:
        return delta_rule_recurrence(q, k, v, beta, g, scale, initial_state, dtype)
    assert q.shape[0] == 1, "cu_seqlens requires B = 1"
    offsets = [int(x) for x in cu_seqlens.tolist()]
    outs, states = [], []
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        h0 = initial_state[n : n + 1] if initial_state is not None else None
        sl = slice(bos, eos)
        o_n, s_n = delta_rule_recurrence(q[:, sl], k[:, sl], v[:, sl], beta[:, sl],
                                         g[:, sl] if g is not None else None, scale, h0, dtype)
        outs.append(o_n)
        states.append(s_n)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


def flow_recurrence(q, k, v, beta, g=None, scale=1.0, initial_state=None, form="product", dtype=torch.float64):
    """Rank-R delta rule (ALGORITHMS.md §2), token by token: ``q [B, T, H, K]``, ``k [B, T, R, H, K]``,
    ``v [B, T, R, H, V]``, ``beta [B, T, R, H]``, ``g [B, T, H]``. Per token, with ``a_t = exp(g_t)``:

        product:       S <- a_t S, then for j = 1..R:  S <- S + beta_j k_j (v_j - S^T k_j)^T
        simultaneous:  S <- a_t S - sum_j beta_j k_j (a_t S^T k_j)^T + sum_j beta_j k_j v_j^T   (one S_{t-1})
        o_t = scale * S^T q_t
    """
    B, T, R, H, K = k.shape
    V = v.shape[-1]
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    S = initial_state.to(dtype) if initial_state is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(dtype).exp()[..., None, None]
        if form == "product":
            for j in range(R):
                kj = k[:, t, j]
                err = v[:, t, j] - torch.einsum("bhkv,bhk->bhv", S, kj)
                S = S + beta[:, t, j, :, None, None] * kj[..., :, None] * err[..., None, :]
        elif form == "simultaneous":
            S_prev = S
            for j in range(R):
                kj = k[:, t, j]
                err = v[:, t, j] - torch.einsum("bhkv,bhk->bhv", S_prev, kj)
                S = S + beta[:, t, j, :, None, None] * kj[..., :, None] * err[..., None, :]
        else:
            raise ValueError(form)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o, S


def flow_ref(q, k, v, beta, g=None, form="product", scale=None, initial_state=None, cu_seqlens=None,
             use_qk_l2norm=False, dtype=torch.float64):
    """Reference for ``linflow.flow_delta_rule`` (same layout). Returns ``(o, final_state [N, H, K, V])``."""
    if use_qk_l2norm:
        q, k = l2norm_ref(q.to(dtype)), l2norm_ref(k.to(dtype))
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if cu_seqlens is None:
        return flow_recurrence(q, k, v, beta, g, scale, initial_state, form, dtype)
    assert q.shape[0] == 1, "cu_seqlens requires B = 1"
    offsets = [int(x) for x in cu_seqlens.tolist()]
    outs, states = [], []
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        h0 = initial_state[n : n + 1] if initial_state is not None else None
        sl = slice(bos, eos)
        o_n, s_n = flow_recurrence(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g[:, sl] if g is not None else None,
                                   scale, h0, form, dtype)
        outs.append(o_n)
        states.append(s_n)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)

# ----------------------------------------------------------------------------------------------------------------
# LION (ALGORITHMS.md §4): the explicit T x T masked matrix, every mask entry built from its defining product.

def lion_mask(T, H, *, decay="none", g=None, lam=None, decay_convention="symmetric", g_backward=None,
              dtype=torch.float64):
    """``M [B|1, H, T, T]`` with M_ij = prod of decays between i and j, written as in ALGORITHMS.md §4:

    * none: 1;  fixed: ``lam_h ** |i - j|``;
    * selective, symmetric: ``prod_{t=j+1..i} a_t`` (j <= i), ``prod_{t=i+1..j} b_t`` (j > i);
    * selective, lion_code: ``prod_{t=j..i-1} a_t`` (j <= i), ``prod_{t=i+1..j} b_t`` (j > i);
    with ``a = exp(g)``, ``b = exp(g_backward)`` (``b = a`` when absent). Each product is ``exp`` of a masked sum of
    log decays (an indicator tensor over t, not a difference of cumulative sums)."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    if decay == "none":
        return torch.ones(1, H, T, T, dtype=dtype)
    if decay == "fixed":
        return lam.to(dtype)[None, :, None, None] ** (i - j).abs().to(dtype)
    t = torch.arange(T)[None, None, :]
    i3, j3 = i[..., None], j[..., None]
    if decay_convention == "symmetric":
        lower = (j3 < t) & (t <= i3)          # t in j+1..i
    else:
        lower = (j3 <= t) & (t < i3)          # t in j..i-1
    upper = (i3 < t) & (t <= j3)              # t in i+1..j
    gf = g.to(dtype)
    gb = (g_backward if g_backward is not None else g).to(dtype)
    log_lower = torch.einsum("ijt,bth->bhij", lower.to(dtype), gf)
    log_upper = torch.einsum("ijt,bth->bhij", upper.to(dtype), gb)
    return torch.where(j <= i, log_lower.exp(), log_upper.exp())


def lion_full(q, k, v, M, *, normalize=True, eps=1e-6, scale=1.0):
    """``o_i = sum_j A_ij v_j / (sum_j A_ij + eps)`` (or the numerator alone), ``A = scale * M o (q k^T)``."""
    A = scale * M * torch.einsum("bihk,bjhk->bhij", q, k)
    num = torch.einsum("bhij,bjhv->bihv", A, v)
    if not normalize:
        return num
    return num / (A.sum(-1).transpose(1, 2)[..., None] + eps)


def lion_ref(q, k, v, g=None, *, decay="none", lam=None, normalize=True, eps=1e-6, scale=None, cu_seqlens=None,
             decay_convention="symmetric", g_backward=None, dtype=torch.float64):
    """Reference for ``linflow.lion`` (same signature and layout), in ``dtype``; with ``cu_seqlens`` (B = 1) every
    sequence runs alone."""
    if scale is None:
        scale = 1.0 if normalize else q.shape[-1] ** -0.5
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    q, k, v, g, lam, g_backward = map(cast, (q, k, v, g, lam, g_backward))

    def run(q, k, v, g, gb):
        M = lion_mask(q.shape[1], q.shape[2], decay=decay, g=g, lam=lam, decay_convention=decay_convention,
                      g_backward=gb, dtype=dtype)
        return lion_full(q, k, v, M, normalize=normalize, eps=eps, scale=scale)

    if cu_seqlens is None:
        return run(q, k, v, g, g_backward)
    offsets = [int(x) for x in cu_seqlens.tolist()]
    sl = lambda x, a, b: None if x is None else x[:, a:b]  # noqa: E731
    return torch.cat([run(q[:, a:b], k[:, a:b], v[:, a:b], sl(g, a, b), sl(g_backward, a, b))
                      for a, b in zip(offsets[:-1], offsets[1:])], dim=1)

def deltaformer_ref(q, k, v, beta=None, w=None, scale=None, cu_seqlens=None, dtype=torch.float64):
    r"""Reference for ``linflow.deltaformer`` (ALGORITHMS.md §3), token by token in ``dtype``:

        u_1 = v_1;  u_i = v_i - beta_i sum_{j<i} softmax_{j<i}(s w_i.k_j) u_j       (per KV head; w = k if None)
        o_i = sum_{j<=i} softmax_j(s q_i.k_j) u_j                                   (query head h: KV head h // G)

    ``q [B, T, H, K]``, ``k, w [B, T, Hkv, K]``, ``v [B, T, Hkv, V]``, ``beta [B, T, Hkv]`` (None: 1). With
    ``cu_seqlens`` (B = 1) every sequence runs alone. Returns ``(o [B, T, H, V], u [B, T, Hkv, V])``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if cu_seqlens is not None:
        assert q.shape[0] == 1, "cu_seqlens requires B = 1"
        offsets = [int(x) for x in cu_seqlens.tolist()]
        outs, us = [], []
        for bos, eos in zip(offsets[:-1], offsets[1:]):
            sl = lambda x: None if x is None else x[:, bos:eos]  # noqa: E731
            o_n, u_n = deltaformer_ref(sl(q), sl(k), sl(v), sl(beta), sl(w), scale, None, dtype)
            outs.append(o_n)
            us.append(u_n)
        return torch.cat(outs, dim=1), torch.cat(us, dim=1)
    B, T, H, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    w = k if w is None else w.to(dtype)
    beta = torch.ones(B, T, Hkv, dtype=dtype, device=q.device) if beta is None else beta.to(dtype)
    us = []
    for i in range(T):
        if i == 0:
            us.append(v[:, 0])
            continue
        prev = torch.stack(us, dim=1)                                             # [B, i, Hkv, V]
        logits = scale * torch.einsum("bhk,bjhk->bhj", w[:, i], k[:, :i])          # [B, Hkv, i]
        p = torch.softmax(logits, dim=-1)
        us.append(v[:, i] - beta[:, i, :, None] * torch.einsum("bhj,bjhv->bhv", p, prev))
    u = torch.stack(us, dim=1) if us else v.new_zeros(B, 0, Hkv, V)
    G = H // Hkv
    kr, ur = k.repeat_interleave(G, dim=2), u.repeat_interleave(G, dim=2)
    outs = []
    for i in range(T):
        logits = scale * torch.einsum("bhk,bjhk->bhj", q[:, i], kr[:, : i + 1])   # [B, H, i+1]
        outs.append(torch.einsum("bhj,bjhv->bhv", torch.softmax(logits, dim=-1), ur[:, : i + 1]))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o, u
