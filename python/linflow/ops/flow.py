r"""Rank-R delta rule: ParallelFlow / DeltaProduct (ALGORITHMS.md §2).

Each token carries ``R`` (key, value, strength) triples; with ``a_t = exp(g_t)`` (g = None: ``a_t = 1``),
``K_t = [k_{t,1..R}]``, ``V_t = [v_{t,1..R}]``, ``B_t = diag(beta_{t,.})``:

    product form       S_t = (I - b_R k_R k_R^T) ... (I - b_1 k_1 k_1^T) a_t S_{t-1} + (the matching writes)
                       (R delta steps in order, the decay once per token: DeltaProduct)
    simultaneous form  S_t = a_t (I - K_t B_t K_t^T) S_{t-1} + K_t B_t V_t^T        (ParallelFlow's rank-R step)
    o_t = scale * S_t^T q_t

Both run the delta rule's chunk (WY) form on the interleaved length-``T·R`` sequence (``torch.ops.linflow.flow_fwd
/ flow_bwd``, hand-written backward); they differ only in the strictly lower matrix ``A``, which the simultaneous
form zeroes between the ``R`` rows of one token. State and accumulation in fp32 (fp64 for fp64 inputs). On CUDA the
ops run this device-generic ATen form until dedicated kernels land.

``scan="parallel"`` replaces the loop over all chunks by the segment scan of :mod:`linflow.ops.scan` (built from
this op: every segment's affine map at once, a short scan over segments, every segment's outputs at once; autograd
differentiates the composition). The op itself also takes ``scan="parallel"``: a log-depth prefix scan over every
chunk's map in ATen (CPU-oriented). ``scan="auto"`` picks the segment scan for a few long sequences on CUDA
(:func:`linflow.ops.scan.resolve_scan`, thresholds from H100 measurements) and the sequential loop otherwise.
"""
from __future__ import annotations

import torch

from linflow import _C_loader  # noqa: F401  (registers the ops)
from linflow.ops.delta_rule import _contiguous, _state_dtype, l2norm
from linflow.ops.scan import flow_segment_scan, resolve_scan

_fwd = torch.ops.linflow.flow_fwd
_bwd = torch.ops.linflow.flow_bwd
_transition = torch.ops.linflow.flow_transition

FORMS = ("product", "simultaneous")
SCANS = ("sequential", "parallel", "auto")


@torch.library.register_fake("linflow::flow_fwd")
def _(q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, form, scan):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty((B, T, H, V))
    ht = q.new_empty((N, H, K, V) if output_final_state else (0,), dtype=_state_dtype(q))
    return o, ht


@torch.library.register_fake("linflow::flow_bwd")
def _(q, k, v, beta, g, initial_state, cu_seqlens, grad_o, grad_final_state, scale, form, scan):
    dg = torch.empty_like(g) if g is not None else q.new_empty((0,))
    dh0 = torch.empty_like(initial_state) if initial_state is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta), dg, dh0


def _setup_context(ctx, inputs, output):
    q, k, v, beta, g, initial_state, cu_seqlens, scale, output_final_state, form, scan = inputs
    ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens)
    ctx.scale, ctx.form, ctx.scan = scale, form, scan


def _backward(ctx, grad_o, grad_final_state):
    q, k, v, beta, g, initial_state, cu_seqlens = ctx.saved_tensors
    if grad_final_state is not None and grad_final_state.numel() == 0:
        grad_final_state = None
    dq, dk, dv, dbeta, dg, dh0 = _bwd(q, k, v, beta, g, initial_state, cu_seqlens, grad_o.contiguous(),
                                      grad_final_state, ctx.scale, ctx.form, ctx.scan)
    return (dq, dk, dv, dbeta, dg if g is not None else None, dh0 if initial_state is not None else None,
            None, None, None, None, None)


torch.library.register_autograd("linflow::flow_fwd", _backward, setup_context=_setup_context)


def _check_choice(fn: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def flow_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    form: str = "product",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    scan: str = "sequential",
    segment: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Rank-R delta rule (DeltaProduct with ``form="product"``, ParallelFlow with ``form="simultaneous"``).

    Args:
        q: ``[B, T, H, K]``; k: ``[B, T, R, H, K]``; v: ``[B, T, R, H, V]``; fp32, bf16 or fp16 (fp64 on CPU),
            one dtype. ``R = 1`` is exactly :func:`linflow.delta_rule`.
        beta: ``[B, T, R, H]`` write strengths (any float dtype).
        g: ``[B, T, H]`` log decay (``<= 0``), one per token, or None.
        form: ``"product"`` (R delta steps in order) or ``"simultaneous"`` (one rank-R step).
        scale: output scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of sequences with ``cu_seqlens``).
        output_final_state: also return the final state ``[N, H, K, V]`` (fp32; fp64 for fp64 inputs).
        cu_seqlens: int32/int64 ``[N + 1]`` token offsets of packed sequences (requires B = 1).
        use_qk_l2norm: L2-normalise q and k over K inside the op (gradients flow through the norm).
        scan: ``"sequential"`` (loop over chunks), ``"parallel"`` (segment scan, :mod:`linflow.ops.scan`: every
            segment's affine map at once, a short scan over segments, then every segment's outputs at once; equal
            up to rounding; with ``cu_seqlens`` it reads the lengths on the host) or ``"auto"`` (parallel on CUDA
            for a few long sequences, see :func:`linflow.ops.scan.resolve_scan`; decided from shapes alone).
        segment: tokens per segment of the parallel scan (rounded up to a multiple of 64); default: sized to fill
            the device.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in q's dtype; ``final_state`` is None unless requested.
    """
    _check_choice("flow_delta_rule", "form", form, FORMS)
    _check_choice("flow_delta_rule", "scan", scan, SCANS)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v, beta, g, initial_state = map(_contiguous, (q, k, v, beta, g, initial_state))
    scan = resolve_scan(scan, q, cu_seqlens)
    if scan == "parallel":
        o, ht = flow_segment_scan(q, k, v, beta, g, initial_state, cu_seqlens, float(scale), bool(output_final_state),
                                  form, segment)
    else:
        o, ht = _fwd(q, k, v, beta, g, initial_state, cu_seqlens, float(scale), bool(output_final_state), form,
                     "sequential")
    return o, (ht if output_final_state else None)


def flow_transition(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    form: str = "product",
    segment: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The affine state map of every segment of ``segment`` tokens: ``S_out = P S_in + Q`` with

        P = e^{gamma_C} I - K^T diag(e^{gamma_C - gamma}) W,   Q = K^T diag(e^{gamma_C - gamma}) U   (WY form)

    Args as :func:`flow_delta_rule` (no q). The last segment is zero-padded (padding is the identity map).

    Returns:
        ``P [B, NS, H, K, K]`` and ``Q [B, NS, H, K, V]`` (fp32; fp64 for fp64 inputs), ``NS = ceil(T / segment)``.
        Composing them in order, ``(P2, Q2) o (P1, Q1) = (P2 P1, P2 Q1 + Q2)``, maps the initial state to the
        final one. Differentiable (built from ATen ops).
    """
    _check_choice("flow_transition", "form", form, FORMS)
    return _transition(k, v, beta, g, form, int(segment))
