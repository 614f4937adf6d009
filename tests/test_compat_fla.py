"""linflow.compat.fla: fla's signatures, and each wrapper equal to linflow.delta_rule on the transformed inputs
(fp32) and to a float64 token-by-token recurrence written here (gate, grouped heads, beta transforms, state layout)."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import linflow
from linflow.compat import fla

# fla's positional parameters, in order (fla/ops/{delta_rule,gated_delta_rule}/{chunk,fused_recurrent}.py).
FLA_SIGNATURES = {
    "chunk_delta_rule": ["q", "k", "v", "beta", "scale", "initial_state", "output_final_state",
                         "use_qk_l2norm_in_kernel", "cu_seqlens", "cu_seqlens_cpu"],
    "chunk_gated_delta_rule": ["q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state",
                               "use_qk_l2norm_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval",
                               "state_v_first", "cu_seqlens", "cu_seqlens_cpu", "chunk_indices", "cp_context"],
    "fused_recurrent_delta_rule": ["q", "k", "v", "beta", "scale", "initial_state", "output_final_state",
                                   "use_qk_l2norm_in_kernel", "cu_seqlens"],
    "fused_recurrent_gated_delta_rule": ["q", "k", "v", "g", "gk", "gv", "beta", "scale", "initial_state",
                                         "output_final_state", "use_qk_l2norm_in_kernel", "use_gate_in_kernel",
                                         "A_log", "dt_bias", "use_beta_sigmoid_in_kernel", "allow_neg_eigval",
                                         "state_v_first", "cu_seqlens"],
}
# fla reads these from **kwargs; we name them (keyword-only).
FLA_KWARGS = {
    "chunk_delta_rule": ["chunk_size", "head_first"],
    "chunk_gated_delta_rule": ["use_gate_in_kernel", "A_log", "dt_bias", "chunk_size", "head_first",
                               "transpose_state_layout"],
    "fused_recurrent_delta_rule": [],
    "fused_recurrent_gated_delta_rule": ["transpose_state_layout"],
}


@pytest.mark.parametrize("name", sorted(FLA_SIGNATURES))
def test_signature_matches_fla(name):
    params = inspect.signature(getattr(fla, name)).parameters.values()
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    keyword_only = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    assert positional == FLA_SIGNATURES[name]
    assert keyword_only == FLA_KWARGS[name]


def test_aliases():
    assert fla.chunk_gdn is fla.chunk_gated_delta_rule
    assert fla.fused_recurrent_gdn is fla.fused_recurrent_gated_delta_rule


# ----------------------------------------------------------------------------------------------------------------
# float64 oracle: one token at a time, value head hv reads key head hv // (HV // H).
def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def recurrence(q, k, v, beta, g, scale, h0=None, l2norm=False):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    kh = torch.arange(HV) // (HV // H)
    if l2norm:
        q, k = _l2(q), _l2(k)
    S = torch.zeros(B, HV, K, V, dtype=torch.float64) if h0 is None else h0.clone()
    out = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        kt, qt = k[:, t, kh], q[:, t, kh]
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt)
        S = S + beta[:, t, :, None, None] * kt[..., None] * err[..., None, :]
        out.append(scale * torch.einsum("bhkv,bhk->bhv", S, qt))
    return torch.stack(out, 1), S


def _inputs(B, T, H, HV, K, V, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, HV, V), beta_logit=r(B, T, HV), g_raw=r(B, T, HV),
                A_log=r(HV) * 0.5, dt_bias=r(HV) * 0.5, h0=r(B, HV, K, V) * 0.1)


def _leaves(d):
    return {n: t.clone().requires_grad_() for n, t in d.items()}


def _grads(out, final, leaves, seed=1):
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
    return torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)


def _close(a, b, tol):
    assert (a - b).abs().max().item() <= tol * (1 + b.abs().max().item()), (a - b).abs().max().item()


@pytest.mark.parametrize("state_v_first", [False, True])
@pytest.mark.parametrize("H,HV", [(2, 2), (1, 3), (2, 4)])
@pytest.mark.parametrize("fn", ["chunk", "fused_recurrent"])
def test_gated_matches_float64_recurrence(fn, H, HV, state_v_first):
    B, T, K, V = 2, 37, 8, 5
    x = _leaves(_inputs(B, T, H, HV, K, V))
    h0 = x["h0"].transpose(-1, -2) if state_v_first else x["h0"]
    kw = dict(scale=0.3, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
              use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"], use_beta_sigmoid_in_kernel=True,
              allow_neg_eigval=True, state_v_first=state_v_first)
    if fn == "chunk":
        o, ht = fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g_raw"], x["beta_logit"], **kw, chunk_size=16)
    else:
        o, ht = fla.fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g_raw"], beta=x["beta_logit"], **kw)
    if state_v_first:
        assert ht.shape == (B, HV, V, K)
        ht = ht.transpose(-1, -2)

    g_ref = -x["A_log"].exp() * F.softplus(x["g_raw"] + x["dt_bias"])
    beta_ref = 2 * torch.sigmoid(x["beta_logit"])
    o_ref, ht_ref = recurrence(x["q"], x["k"], x["v"], beta_ref, g_ref, 0.3, x["h0"], l2norm=True)
    _close(o, o_ref, 1e-10)
    _close(ht, ht_ref, 1e-10)
    for name, a, b in zip(x, _grads(o, ht, x), _grads(o_ref, ht_ref, x)):
        assert a is not None, name
        _close(a, b, 1e-9)


@pytest.mark.parametrize("fn", ["chunk", "fused_recurrent"])
def test_delta_rule_matches_float64_recurrence(fn):
    B, T, H, K, V = 2, 21, 3, 6, 7
    x = _leaves(_inputs(B, T, H, H, K, V))
    f = fla.chunk_delta_rule if fn == "chunk" else fla.fused_recurrent_delta_rule
    o, ht = f(x["q"], x["k"], x["v"], torch.sigmoid(x["beta_logit"]), None, x["h0"], True, True)
    o_ref, ht_ref = recurrence(x["q"], x["k"], x["v"], torch.sigmoid(x["beta_logit"]), None, K ** -0.5, x["h0"],
                               l2norm=True)
    _close(o, o_ref, 1e-10)
    _close(ht, ht_ref, 1e-10)
    for name, a, b in zip(x, _grads(o, ht, x), _grads(o_ref, ht_ref, x)):
        if name in ("g_raw", "A_log", "dt_bias"):
            continue
        _close(a, b, 1e-9)


def test_fused_recurrent_defaults_beta_to_one_and_no_decay():
    B, T, H, K, V = 1, 9, 2, 4, 4
    x = _inputs(B, T, H, 2 * H, K, V)
    o, _ = fla.fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"])
    o_ref, _ = recurrence(x["q"], x["k"], x["v"], torch.ones(B, T, 2 * H, dtype=torch.float64), None, K ** -0.5)
    _close(o, o_ref, 1e-10)
    o2, _ = fla.fused_recurrent_delta_rule(x["q"], x["k"], x["v"][:, :, :H])
    o2_ref, _ = recurrence(x["q"], x["k"], x["v"][:, :, :H], torch.ones(B, T, H, dtype=torch.float64), None,
                           K ** -0.5)
    _close(o2, o2_ref, 1e-10)


# ----------------------------------------------------------------------------------------------------------------
# fp32: each wrapper equals linflow.delta_rule on the equivalent inputs (values and gradients).
def test_chunk_gated_equals_delta_rule_fp32():
    B, T, H, HV, K, V = 2, 70, 2, 4, 16, 8
    x = _leaves(_inputs(B, T, H, HV, K, V, dtype=torch.float32, seed=3))
    o, ht = fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], F.logsigmoid(x["g_raw"]), x["beta_logit"],
                                       initial_state=x["h0"], output_final_state=True,
                                       use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    q, k = (x[n].repeat_interleave(HV // H, dim=2) for n in "qk")
    o_ref, ht_ref = linflow.delta_rule(q, k, x["v"], torch.sigmoid(x["beta_logit"]), F.logsigmoid(x["g_raw"]),
                                       initial_state=x["h0"], output_final_state=True, use_qk_l2norm=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(ht, ht_ref)
    for name, a, b in zip(x, _grads(o, ht, x), _grads(o_ref, ht_ref, x)):
        if a is None:
            assert b is None, name
        else:
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("fn", ["chunk_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_delta_rule",
                                "fused_recurrent_gated_delta_rule"])
def test_varlen_equals_separate_runs(fn, index_dtype):
    lens = [5, 1, 40, 19]
    H, HV, K, V = (1, 2, 8, 8) if "gated" in fn else (2, 2, 8, 8)
    T = sum(lens)
    x = _inputs(1, T, H, HV, K, V, dtype=torch.float32, seed=4)
    h0 = torch.randn(len(lens), HV, K, V) * 0.1
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=index_dtype)
    beta, g = torch.sigmoid(x["beta_logit"]), F.logsigmoid(x["g_raw"])
    f = getattr(fla, fn)

    def call(sl, init, cu_seqlens):
        args = dict(initial_state=init, output_final_state=True, cu_seqlens=cu_seqlens)
        q, k, v = x["q"][:, sl], x["k"][:, sl], x["v"][:, sl]
        if fn == "chunk_gated_delta_rule":
            return f(q, k, v, g[:, sl], beta[:, sl], cu_seqlens_cpu=cu_seqlens, **args)
        if fn == "fused_recurrent_gated_delta_rule":
            return f(q, k, v, g[:, sl], beta=beta[:, sl], **args)
        if fn == "chunk_delta_rule":
            return f(q, k, v, beta[:, sl], cu_seqlens_cpu=cu_seqlens, **args)
        return f(q, k, v, beta[:, sl], **args)

    o, ht = call(slice(None), h0, cu)
    for n in range(len(lens)):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        o_n, ht_n = call(sl, h0[n:n + 1], None)
        torch.testing.assert_close(o[:, sl], o_n)
        torch.testing.assert_close(ht[n:n + 1], ht_n)


def test_fused_recurrent_equals_chunk():
    B, T, H, HV, K, V = 2, 33, 2, 2, 8, 8
    x = _inputs(B, T, H, HV, K, V, dtype=torch.float32, seed=5)
    kw = dict(initial_state=x["h0"], output_final_state=True, use_gate_in_kernel=True, A_log=x["A_log"],
              dt_bias=x["dt_bias"], use_beta_sigmoid_in_kernel=True)
    a = fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g_raw"], x["beta_logit"], **kw)
    b = fla.fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g_raw"], beta=x["beta_logit"], **kw)
    torch.testing.assert_close(a, b)


def test_gate_in_kernel_without_dt_bias():
    x = _inputs(1, 12, 2, 2, 4, 4)
    o, _ = fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g_raw"], torch.sigmoid(x["beta_logit"]),
                                      use_gate_in_kernel=True, A_log=x["A_log"])
    g = -x["A_log"].exp() * F.softplus(x["g_raw"])
    o_ref, _ = recurrence(x["q"], x["k"], x["v"], torch.sigmoid(x["beta_logit"]), g, 0.5)
    _close(o, o_ref, 1e-10)


def test_transpose_state_layout_is_a_deprecated_alias():
    x = _inputs(1, 8, 2, 2, 4, 6)
    beta, g = torch.sigmoid(x["beta_logit"]), F.logsigmoid(x["g_raw"])
    with pytest.warns(DeprecationWarning, match="state_v_first"):
        _, ht = fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], g, beta, output_final_state=True,
                                           transpose_state_layout=True)
    assert ht.shape == (1, 2, 6, 4)


# ----------------------------------------------------------------------------------------------------------------
# refusals: what fla refuses, and what we cannot do.
def test_refusals():
    x = _inputs(2, 8, 2, 2, 4, 4, dtype=torch.float32)
    q, k, v, g, beta = x["q"], x["k"], x["v"], F.logsigmoid(x["g_raw"]), torch.sigmoid(x["beta_logit"])
    with pytest.raises(NotImplementedError, match="gk"):
        fla.fused_recurrent_gated_delta_rule(q, k, v, g, gk=torch.zeros(2, 8, 2, 4), beta=beta)
    with pytest.raises(NotImplementedError, match="gv"):
        fla.fused_recurrent_gated_delta_rule(q, k, v, g, gv=torch.zeros(2, 8, 2, 4), beta=beta)
    with pytest.raises(NotImplementedError, match="per-value beta"):
        fla.fused_recurrent_delta_rule(q, k, v, torch.rand(2, 8, 2, 4))
    with pytest.raises(NotImplementedError, match="cp_context"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, cp_context=object())
    with pytest.raises(DeprecationWarning, match="head_first"):
        fla.chunk_delta_rule(q, k, v, beta, head_first=False)
    with pytest.raises(DeprecationWarning, match="head_first"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, head_first=True)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, allow_neg_eigval=True)
    with pytest.raises(ValueError, match="A_log"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="A_log"):
        fla.fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="divisible"):
        fla.chunk_gated_delta_rule(q, k, torch.randn(2, 8, 3, 4), g[..., :1].expand(2, 8, 3),
                                   beta[..., :1].expand(2, 8, 3))
    with pytest.raises(ValueError, match="batch size"):
        fla.chunk_delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="initial states"):
        fla.chunk_gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1], initial_state=torch.zeros(2, 2, 4, 4),
                                   cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="chunk_size"):
        fla.chunk_delta_rule(q, k, v, beta, chunk_size=128)
    with pytest.raises(ValueError, match="scale"):
        fla.fused_recurrent_delta_rule(q, k, v, beta, scale=-1.0)


def test_default_scale_is_inverse_sqrt_k():
    x = _inputs(1, 6, 1, 1, 9, 3)
    beta = torch.sigmoid(x["beta_logit"])
    o, _ = fla.chunk_delta_rule(x["q"], x["k"], x["v"], beta)
    o_ref, _ = recurrence(x["q"], x["k"], x["v"], beta, None, 1 / math.sqrt(9))
    _close(o, o_ref, 1e-10)


# ----------------------------------------------------------------------------------------------------------------
# deltaformer_attn (fla.ops.deltaformer.parallel): fla's write query is q, its scale D ** -0.5

def test_deltaformer_attn_signature_matches_fla():
    params = inspect.signature(fla.deltaformer_attn).parameters.values()
    assert [p.name for p in params] == ["q", "k", "v", "beta", "attention_mask", "cu_seqlens", "C"]


def _deltaformer_inputs(B, T, H, Hkv, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return r(B, T, H, D), r(B, T, Hkv, D), r(B, T, Hkv, D), torch.rand(B, T, H, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("with_beta", [False, True])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2)])
def test_deltaformer_attn_matches_float64_recurrence(H, Hkv, with_beta):
    from reference import deltaformer_ref
    q, k, v, beta = _deltaformer_inputs(2, 37, H, Hkv, 8)
    beta = beta if with_beta else None
    ins = _leaves(dict(q=q, k=k, v=v, **({"beta": beta} if with_beta else {})))
    o = fla.deltaformer_attn(**ins)
    kr, vr = (x.repeat_interleave(H // Hkv, dim=2) for x in (ins["k"], ins["v"]))
    ro, _ = deltaformer_ref(ins["q"], kr, vr, ins.get("beta"), ins["q"], scale=8 ** -0.5)
    _close(o, ro, 1e-10)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    for a, b in zip(torch.autograd.grad((o * do).sum(), list(ins.values())),
                    torch.autograd.grad((ro * do).sum(), list(ins.values()))):
        _close(a, b, 1e-10)


def test_deltaformer_attn_padding_mask_equals_separate_runs():
    q, k, v, beta = _deltaformer_inputs(3, 20, 2, 2, 8)
    lengths = [20, 7, 13]
    mask = torch.zeros(3, 20, dtype=torch.long)
    mask[0] = 1
    mask[1, 20 - 7:] = 1  # left padding
    mask[2, :13] = 1  # right padding
    o = fla.deltaformer_attn(q, k, v, beta, attention_mask=mask)
    for b, n in enumerate(lengths):
        sl = mask[b].bool()
        ob = fla.deltaformer_attn(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], beta[b:b + 1, sl])
        _close(o[b:b + 1, sl], ob, 1e-12)
        assert (o[b, ~sl] == 0).all()


def test_deltaformer_attn_varlen_equals_separate_runs():
    q, k, v, beta = _deltaformer_inputs(1, 30, 2, 1, 8)
    cu = torch.tensor([0, 4, 4, 30])
    o = fla.deltaformer_attn(q, k, v, beta, cu_seqlens=cu)
    for bos, eos in ((0, 4), (4, 30)):
        _close(o[:, bos:eos], fla.deltaformer_attn(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], beta[:, bos:eos]),
               1e-12)
    with pytest.raises(ValueError, match="batch size"):
        fla.deltaformer_attn(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), cu_seqlens=cu)
