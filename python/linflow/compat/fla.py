r"""Drop-in replacements for flash-linear-attention's delta-rule ops, with fla's argument names and order.
(:func:`deltaformer_attn`, fla's ``fla.ops.deltaformer.deltaformer_attn``, is at the end of this module.)

    from linflow.compat.fla import chunk_gated_delta_rule      # instead of fla.ops.gated_delta_rule

Every function computes (ALGORITHMS.md §1), per sequence and value head ``hv`` with key head ``h = hv // (HV // H)``:

    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,   a_t = exp(g_t),   o_t = scale * S_t^T q_t

by calling :func:`linflow.delta_rule` on transformed inputs:

- grouped value heads (``HV % H == 0``): q and k are repeated ``HV // H`` times along heads
  (``repeat_interleave``, so autograd sums the gradients of the heads that share a key head);
- ``state_v_first``: states are ``[N, HV, V, K]``; transposed on the way in and out;
- ``use_gate_in_kernel``: ``g`` is the raw gate input, the log decay is ``-exp(A_log) * softplus(g + dt_bias)``
  (computed in fp32, as fla's ``naive_gdn_gate``); gradients reach ``g``, ``A_log`` and ``dt_bias``;
- ``use_beta_sigmoid_in_kernel``: ``beta <- sigmoid(beta)``, times 2 with ``allow_neg_eigval``;
- ``use_qk_l2norm_in_kernel``: q and k L2-normalised over K inside the op (fla's ``eps = 1e-6``).

Where we do more than fla: fp32 inputs are accepted by the chunk functions (fla refuses them), fp64 and CPU
tensors work, the ``fused_recurrent_*`` functions have a backward (fla's gated one raises), and
:func:`chunk_delta_rule` / :func:`fused_recurrent_delta_rule` accept grouped value heads too.
The ``fused_recurrent_*`` functions run the same chunked op as the ``chunk_*`` ones: same math, one
implementation (for single-token decoding against a state cache use :func:`linflow.delta_rule_step`).

:func:`chunk_gated_delta_product` (DeltaProduct, ALGORITHMS.md §2) takes fla's interleaved key layout
``k [B, T * num_householder, H, K]`` and runs :func:`linflow.flow_delta_rule` (product form) on a view of it.

Not supported (raise ``NotImplementedError``): per-key / per-value decays ``gk`` / ``gv``, a per-value beta
(``[B, T, H, V]``), context parallelism (``cp_context``). ``chunk_indices`` and ``cu_seqlens_cpu`` are accepted
and not needed (our op derives chunk boundaries from ``cu_seqlens`` itself).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from linflow.ops.delta_rule import delta_rule
from linflow.ops.flow import flow_delta_rule
from linflow.ops.deltaformer import deltaformer

__all__ = [
    "deltaformer_attn",
    "chunk_delta_rule",
    "chunk_gated_delta_product",
    "chunk_gated_delta_rule",
    "chunk_gdn",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gdn",
]


def gdn_gate(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gated DeltaNet log decay ``-exp(A_log) * softplus(g + dt_bias)`` in fp32, or fp64 for fp64 inputs
    (``A_log``, ``dt_bias``: ``[HV]``)."""
    dtype = torch.promote_types(g.dtype, torch.float32)
    x = g.to(dtype)
    if dt_bias is not None:
        x = x + dt_bias.to(dtype)
    return -A_log.to(dtype).exp() * F.softplus(x)


def _check_varlen(q: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> None:
    if cu_seqlens is None:
        return
    if q.shape[0] != 1:
        raise ValueError(f"The batch size is expected to be 1 rather than {q.shape[0]} when using `cu_seqlens`. "
                         "Please flatten variable-length inputs before processing.")
    if initial_state is not None and initial_state.shape[0] != cu_seqlens.shape[0] - 1:
        raise ValueError("The number of initial states is expected to be equal to the number of input sequences, "
                         f"i.e., {cu_seqlens.shape[0] - 1} rather than {initial_state.shape[0]}.")


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"`chunk_size` must be 16, 32, or 64, got {chunk_size}.")


def _refuse_head_first(head_first: bool | None) -> None:
    # fla removed head_first and raises on its presence, whatever its value; so do we.
    if head_first is not None:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")


def _state_v_first_alias(state_v_first: bool, transpose_state_layout: bool | None) -> bool:
    if transpose_state_layout is None:
        return state_v_first
    if state_v_first:
        raise ValueError("Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`.")
    warnings.warn("`transpose_state_layout` is deprecated and renamed to `state_v_first`.", DeprecationWarning,
                  stacklevel=3)
    return bool(transpose_state_layout)


def _beta(beta: torch.Tensor, use_beta_sigmoid: bool, allow_neg_eigval: bool) -> torch.Tensor:
    if allow_neg_eigval and not use_beta_sigmoid:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    if beta.dim() == 4:
        raise NotImplementedError("linflow.compat.fla: a per-value beta of shape [B, T, H, V] is not supported; "
                                  "pass beta of shape [B, T, H]")
    if use_beta_sigmoid:
        beta = torch.sigmoid(beta)
        if allow_neg_eigval:
            beta = beta * 2
    return beta


def _delta_rule_gva(q, k, v, beta, g, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                    state_v_first, chunk_size):
    """linflow.delta_rule with grouped value heads (q, k: H heads; v, beta, g, state: HV heads) and an optional
    V-first state layout."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same number of heads, but got q.shape[2]={q.shape[2]} "
                         f"and k.shape[2]={k.shape[2]}")
    H, HV = q.shape[2], v.shape[2]
    if HV % H != 0:
        raise ValueError(f"For GVA, num_v_heads (HV={HV}) must be evenly divisible by num_heads (H={H}), "
                         f"but got HV % H = {HV % H}")
    _check_varlen(q, initial_state, cu_seqlens)
    if scale is None:
        scale = k.shape[-1] ** -0.5
    if HV != H:
        q = q.repeat_interleave(HV // H, dim=2)
        k = k.repeat_interleave(HV // H, dim=2)
    if state_v_first and initial_state is not None:
        initial_state = initial_state.transpose(-1, -2)
    o, final_state = delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size)
    if state_v_first and final_state is not None:
        final_state = final_state.transpose(-1, -2).contiguous()
    return o, final_state


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    head_first: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""DeltaNet, as ``fla.ops.delta_rule.chunk_delta_rule``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` (``HV = H`` in fla; a multiple of ``H`` here).
        beta: ``[B, T, HV]``.
        scale: default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]``; ``N = B``, or the number of sequences with ``cu_seqlens``.
        output_final_state: also return the final state ``[N, HV, K, V]`` (fp32).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1); ``cu_seqlens_cpu``: accepted, unused.
        chunk_size: 16, 32 or 64.
        head_first: removed in fla; passing it raises, as in fla.

    Returns:
        ``(o [B, T, HV, V] in q's dtype, final_state or None)``.

    More than fla: fp32 / fp64 inputs, CPU tensors, grouped value heads.
    """
    _refuse_head_first(head_first)
    _check_chunk_size(chunk_size)
    if beta.dim() != 3:
        raise ValueError(f"beta must be of shape [B, T, H], got {tuple(beta.shape)}")
    return _delta_rule_gva(q, k, v, beta, None, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                           cu_seqlens, False, chunk_size)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    cp_context: object | None = None,
    *,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    chunk_size: int = 64,
    head_first: bool | None = None,
    transpose_state_layout: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Gated DeltaNet, as ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` with ``HV % H == 0`` (grouped value heads).
        g: ``[B, T, HV]`` log decay (``<= 0``); with ``use_gate_in_kernel`` the raw gate input, turned into
            ``-exp(A_log) * softplus(g + dt_bias)`` (``A_log`` required, ``dt_bias`` optional, both ``[HV]``).
        beta: ``[B, T, HV]``; logits with ``use_beta_sigmoid_in_kernel`` (then ``2 * sigmoid`` with
            ``allow_neg_eigval``, which requires ``use_beta_sigmoid_in_kernel``, as in fla).
        scale: default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``).
        output_final_state: also return the final state, in the same layout (fp32).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1). ``cu_seqlens_cpu``, ``chunk_indices``:
            accepted, unused. ``cp_context``: not supported.
        chunk_size: 16, 32 or 64. ``head_first``: raises, as in fla. ``transpose_state_layout``: deprecated alias
            of ``state_v_first``.

    Returns:
        ``(o [B, T, HV, V] in q's dtype, final_state or None)``.

    More than fla: fp32 / fp64 inputs, CPU tensors.
    """
    if cp_context is not None:
        raise NotImplementedError("linflow.compat.fla.chunk_gated_delta_rule: cp_context (context parallelism) "
                                  "is not supported")
    state_v_first = _state_v_first_alias(state_v_first, transpose_state_layout)
    _refuse_head_first(head_first)
    _check_chunk_size(chunk_size)
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True`.")
        g = gdn_gate(g, A_log, dt_bias)
    beta = _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return _delta_rule_gva(q, k, v, beta, g, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                           cu_seqlens, state_v_first, chunk_size)


def fused_recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""DeltaNet, as ``fla.ops.delta_rule.fused_recurrent_delta_rule`` (computed by the chunked op: same math).

    Args as :func:`chunk_delta_rule`; ``beta`` defaults to ones (``[B, T, HV]``); ``scale`` must be positive.
    A per-value beta ``[B, T, H, V]`` (fla's "headwise" beta) raises ``NotImplementedError``.
    """
    if scale is not None and scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if beta is None:
        beta = torch.ones_like(v[..., 0])
    beta = _beta(beta, False, False)
    return _delta_rule_gva(q, k, v, beta, None, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                           cu_seqlens, False, 64)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    transpose_state_layout: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Gated DeltaNet, as ``fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule`` (computed by the chunked
    op: same math, and differentiable, where fla's has no backward).

    Args as :func:`chunk_gated_delta_rule`, except: ``g`` may be None (no decay); ``beta`` defaults to ones
    (``[B, T, HV]``; fla makes it ``[B, T, H]``, which only works for ``HV = H``). Per-key / per-value decays
    ``gk`` / ``gv`` and a per-value beta ``[B, T, HV, V]`` raise ``NotImplementedError``.
    """
    if gk is not None:
        raise NotImplementedError("linflow.compat.fla.fused_recurrent_gated_delta_rule: per-key decay `gk` is not "
                                  "supported (only the scalar per-head decay `g`)")
    if gv is not None:
        raise NotImplementedError("linflow.compat.fla.fused_recurrent_gated_delta_rule: per-value decay `gv` is not "
                                  "supported (only the scalar per-head decay `g`)")
    state_v_first = _state_v_first_alias(state_v_first, transpose_state_layout)
    if beta is None:
        beta = torch.ones_like(v[..., 0])
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True`.")
        if g is None:
            raise ValueError("`g` (raw pre-activation) must be provided when `use_gate_in_kernel=True`.")
        g = gdn_gate(g, A_log, dt_bias)
    beta = _beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return _delta_rule_gva(q, k, v, beta, g, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                           cu_seqlens, state_v_first, 64)


chunk_gdn = chunk_gated_delta_rule
fused_recurrent_gdn = fused_recurrent_gated_delta_rule


def chunk_gated_delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    num_householder: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""fla's ``chunk_gated_delta_product`` (Gated DeltaProduct): ``num_householder`` delta steps per token, the
    decay ``exp(g_t)`` once per token, the output read after the token's last step.

    Args (fla's layout): q ``[B, T, H, K]``; k ``[B, T * n, H, K]`` and v ``[B, T * n, H, V]`` with the ``n`` steps
    of token ``t`` at rows ``t * n .. t * n + n - 1``; beta ``[B, T * n, H]``; g ``[B, T, H]`` or None;
    ``cu_seqlens`` counts tokens (not steps). fp32 inputs are accepted too (fla refuses them).
    """
    B, T, H, K = q.shape
    n = int(num_householder)
    if n < 1:
        raise ValueError(f"num_householder must be >= 1, got {n}.")
    V = v.shape[-1]
    for name, x, shape in (("k", k, (B, T * n, H, K)), ("v", v, (B, T * n, H, V)), ("beta", beta, (B, T * n, H))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (T * num_householder steps), got {tuple(x.shape)}.")
    if g is not None and tuple(g.shape) != (B, T, H):
        raise ValueError(f"g must have shape {(B, T, H)} (one gate per token), got {tuple(g.shape)}.")
    _check_varlen(q, initial_state, cu_seqlens)
    return flow_delta_rule(q, k.reshape(B, T, n, H, K), v.reshape(B, T, n, H, V), beta.reshape(B, T, n, H), g,
                           form="product", scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                           use_qk_l2norm=use_qk_l2norm_in_kernel)

def deltaformer_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    C: int = 512,
) -> torch.Tensor:
    r"""Deltaformer attention, as ``fla.ops.deltaformer.deltaformer_attn``: :func:`linflow.deltaformer` with fla's
    write query ``w = q`` (query-key write) and scale ``D ** -0.5``.

        u_i = v_i - beta_i sum_{j<i} softmax_{j<i}(q_i.k_j / sqrt(D)) u_j,    o = causal_softmax_attention(q, k, u)

    Args:
        q: ``[B, T, H, D]``. k, v: ``[B, T, Hkv, D]`` (``H % Hkv == 0``; with ``Hkv < H`` k and v are repeated to
            the H query heads, since the write pass runs on the heads of ``w = q``).
        beta: ``[B, T, H]`` (used as given, no sigmoid); None: ones.
        attention_mask: ``[B, T]`` 0/1 padding mask (1 = token). Each row's tokens form one sequence; padded
            positions take no part in either pass and their outputs are 0. (fla runs its write pass over the padded
            rows and masks only the read; the two agree for right padding.)
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B must be 1).
        C: fla's block size; accepted and unused (our result does not depend on the blocking).

    Returns:
        ``o`` ``[B, T, H, D]`` in q's dtype.

    More than fla: fp32 / fp64 inputs, CPU tensors, no flash-attn dependency, and a write pass that respects the
    padding mask.
    """
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"The batch size is expected to be 1 rather than {q.shape[0]} when using `cu_seqlens`. "
                         "Please flatten variable-length inputs before processing.")
    if attention_mask is not None and cu_seqlens is not None:
        raise ValueError("Pass either `attention_mask` or `cu_seqlens`, not both.")
    H, Hkv = q.shape[2], k.shape[2]
    if v.shape[2] != Hkv or H % Hkv != 0:
        raise ValueError(f"k and v must have the same number of heads, dividing q's: got q {H}, k {Hkv}, "
                         f"v {v.shape[2]}")
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    scale = q.shape[-1] ** -0.5
    if attention_mask is None:
        return deltaformer(q, k, v, beta, q, scale=scale, cu_seqlens=cu_seqlens)
    if attention_mask.shape != q.shape[:2]:
        raise ValueError(f"attention_mask must be [B, T] = {tuple(q.shape[:2])}, got {tuple(attention_mask.shape)}")
    B, T = q.shape[:2]
    keep = attention_mask.reshape(-1).bool()
    index = keep.nonzero().squeeze(1)
    lengths = attention_mask.bool().sum(1)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int64)
    packed = [None if x is None else x.reshape(B * T, *x.shape[2:]).index_select(0, index)[None]
              for x in (q, k, v, beta)]
    o = deltaformer(packed[0], packed[1], packed[2], packed[3], packed[0], scale=scale, cu_seqlens=cu)
    out = o.new_zeros(B * T, *o.shape[2:]).index_copy(0, index, o[0])
    return out.view(B, T, *o.shape[2:])
