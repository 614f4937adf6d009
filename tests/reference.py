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
