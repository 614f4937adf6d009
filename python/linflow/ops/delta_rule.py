r"""Delta rule and Gated DeltaNet (ALGORITHMS.md §1).

    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,   a_t = exp(g_t)   (g = None: a_t = 1)
    o_t = scale * S_t^T q_t

Computed in chunk (WY) form by C++/CUDA kernels (`torch.ops.linflow.delta_rule_fwd/bwd`); state and all
accumulation in fp32. Autograd, fake (meta) kernels and torch.compile support are registered here.
"""
from __future__ import annotations

import torch

from linflow import _C_loader  # noqa: F401  (registers the ops)

_fwd = torch.ops.linflow.delta_rule_fwd
_bwd = torch.ops.linflow.delta_rule_bwd
_step = torch.ops.linflow.delta_rule_step


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("linflow::delta_rule_fwd")
def _(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty((B, T, H, V))
    ht = q.new_empty((N, H, K, V) if output_final_state else (0,), dtype=_state_dtype(q))
    return o, ht


@torch.library.register_fake("linflow::delta_rule_bwd")
def _(q, k, v, beta, g, initial_state, cu_seqlens, grad_o, grad_final_state, scale, chunk_size):
    dg = torch.empty_like(g) if g is not None else q.new_empty((0,))
    dh0 = torch.empty_like(initial_state) if initial_state is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta), dg, dh0


@torch.library.register_fake("linflow::delta_rule_step")
def _(q, k, v, beta, g, state, state_indices, scale):
    return torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, chunk_size = inputs
    ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens)
    ctx.scale, ctx.chunk_size = scale, chunk_size


def _backward(ctx, grad_o, grad_final_state):
    q, k, v, beta, g, initial_state, cu_seqlens = ctx.saved_tensors
    if grad_final_state is not None and grad_final_state.numel() == 0:
        grad_final_state = None
    dq, dk, dv, dbeta, dg, dh0 = _bwd(q, k, v, beta, g, initial_state, cu_seqlens, grad_o.contiguous(),
                                      grad_final_state, ctx.scale, ctx.chunk_size)
    return (dq, dk, dv, dbeta, dg if g is not None else None, dh0 if initial_state is not None else None,
            None, None, None, None)


torch.library.register_autograd("linflow::delta_rule_fwd", _backward, setup_context=_setup_context)


@torch.library.register_fake("linflow::l2norm_fwd")
def _(x, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=_state_dtype(x))


@torch.library.register_fake("linflow::l2norm_bwd")
def _(grad_y, x, rstd):
    return torch.empty_like(x)


def _l2norm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])  # x and 1/||x|| only (no fp32 copy of x)
    ctx.mark_non_differentiable(output[1])


def _l2norm_backward(ctx, dy, _drstd):
    x, rstd = ctx.saved_tensors
    return torch.ops.linflow.l2norm_bwd(dy.contiguous(), x, rstd), None


torch.library.register_autograd("linflow::l2norm_fwd", _l2norm_backward, setup_context=_l2norm_setup_context)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, computed in fp32 (fla's convention), returned in x's dtype.
    One fused kernel each way on CUDA (torch.ops.linflow.l2norm_fwd / l2norm_bwd)."""
    return torch.ops.linflow.l2norm_fwd(x.contiguous(), float(eps))[0]


def _contiguous(x):
    return x.contiguous() if x is not None else None


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    scan: str = "sequential",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Chunkwise delta rule (DeltaNet; Gated DeltaNet when ``g`` is given).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; fp32, bf16 or fp16 (fp64 on CPU), one dtype.
        beta: ``[B, T, H]`` write strength (any float dtype; usually in (0, 1), (0, 2) allowed).
        g: ``[B, T, H]`` log decay (``<= 0``), or None for plain DeltaNet.
        scale: output scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of sequences with ``cu_seqlens``).
        output_final_state: also return the final state ``[N, H, K, V]`` (fp32).
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of packed variable-length sequences (requires B = 1).
        use_qk_l2norm: L2-normalise q and k over K inside the op (gradients flow through the norm).
        chunk_size: 16, 32 or 64.
        scan: the state pass: ``"sequential"`` (loop over chunks), ``"parallel"`` (prefix scan over the chunks'
            affine maps, equal up to rounding: the rank-1 case of :func:`linflow.flow_delta_rule`, chunk size 64)
            or ``"auto"`` (parallel for a few long sequences on CUDA: :func:`linflow.ops.scan.resolve_scan`).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in q's dtype; ``final_state`` is None unless requested.
    """
    if scan not in ("sequential", "parallel", "auto"):
        raise ValueError(f'delta_rule: scan must be "sequential", "parallel" or "auto", got {scan!r}')
    if scan == "auto":
        from linflow.ops.scan import resolve_scan

        scan = resolve_scan(scan, q, cu_seqlens) if chunk_size == 64 else "sequential"
    if scan == "parallel":
        if chunk_size != 64:
            raise ValueError(f"delta_rule: scan=\"parallel\" runs chunks of 64 tokens, got chunk_size={chunk_size}")
        from linflow.ops.flow import flow_delta_rule  # the rank-1 flow op (import here: flow imports this module)

        return flow_delta_rule(q, k.unsqueeze(2), v.unsqueeze(2), beta.unsqueeze(2), g, scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, scan="parallel")
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v, beta, g, initial_state = map(_contiguous, (q, k, v, beta, g, initial_state))
    o, ht = _fwd(q, k, v, beta, g, initial_state, cu_seqlens, float(scale), bool(output_final_state), int(chunk_size))
    return o, (ht if output_final_state else None)


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    state_indices: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> torch.Tensor:
    r"""Recurrent decode step: run a few tokens (``[B, T, H, *]``, T small) against a state cache.

    ``state`` (``[N, H, K, V]``, fp32) is updated **in place**; batch row ``b`` reads and writes
    ``state[state_indices[b]]`` (``state[b]`` when ``state_indices`` is None; indices must be distinct).
    No host sync and no value-dependent allocation: safe to capture in a CUDA graph. Returns ``o`` ``[B, T, H, V]``.
    """
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v, beta, g = map(_contiguous, (q, k, v, beta, g))
    return _step(q, k, v, beta, g, state, state_indices, float(scale))
