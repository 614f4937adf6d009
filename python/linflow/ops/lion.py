r"""LION: bidirectional linear attention (ALGORITHMS.md §4; Afzal et al., arXiv 2502.16249).

With feature maps already applied to ``q, k`` (the layer applies them), per sequence and head:

    A_ij = scale * M_ij * (q_i . k_j)
    o_i  = sum_j A_ij v_j / (sum_j A_ij + eps)        (normalize=True)
    o_i  = sum_j A_ij v_j                             (normalize=False)

Masks, from log decays (products of decays are always ``exp`` of differences of cumulative log gates with exponent
``<= 0``, so long sequences cannot overflow):

* ``decay="none"`` (LION-lit): ``M_ij = 1``.
* ``decay="fixed"`` (LION-d): ``M_ij = lam_h^|i-j|``, ``lam`` ``[H]`` in (0, 1).
* ``decay="selective"`` (LION-s), ``a_t = exp(g_t)``, ``c = cumsum(g)``:
  - ``decay_convention="symmetric"`` (default; the paper and the authors' blog):
    ``M_ij = prod_{t=j+1..i} a_t`` (j <= i), ``prod_{t=i+1..j} a_t`` (j > i), i.e. ``exp(-|c_i - c_j|)``;
  - ``decay_convention="lion_code"`` (the authors' released code): below the diagonal the forward sweep uses the
    previous token's decay, ``M_ij = prod_{t=j..i-1} a_t``; above it ``prod_{t=i+1..j} a_t`` as before.
  - ``g_backward``: a separate log decay for the backward (j > i) direction, in either convention.
  For ``fixed`` both conventions give the same mask (the option is ignored).

Modes: ``chunked`` (training; per-chunk masked ``Q K^T`` plus one forward and one backward sweep of ``K x V``
states and the ``K`` normaliser states, linear in T), ``full`` (the explicit ``T x T`` masked form, for short T),
``recurrent`` (inference: two token scans that keep only ``q_i^T S_i`` and ``q_i^T z_i`` per token, so the extra
memory is ``O(T (K + V))``; forward only), ``auto`` (``full`` when ``T <= chunk_size``, else ``chunked``).

Computed by C++ ATen code (``torch.ops.linflow.lion_fwd/lion_bwd``, hand-written backward) on the CPU. On CUDA the
forward of ``chunked`` (and ``auto`` beyond one chunk) with bf16 / fp16 inputs, ``chunk_size=64`` and ``K <= 128``
runs tensor-core sweep kernels (16-bit operands, fp32 accumulation; csrc/lion/kernels.cuh); everything else (fp32
inputs, ``full``, ``recurrent``, the backward) runs the same device-generic ATen form. All ATen arithmetic in fp32
(fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

from linflow import _C_loader  # noqa: F401  (registers the ops)

_fwd = torch.ops.linflow.lion_fwd
_bwd = torch.ops.linflow.lion_bwd

DECAYS = ("none", "fixed", "selective")
CONVENTIONS = ("symmetric", "lion_code")
MODES = ("auto", "chunked", "full", "recurrent")


@torch.library.register_fake("linflow::lion_fwd")
def _(q, k, v, g, g_backward, lam, cu_seqlens, decay, decay_convention, normalize, eps, scale, mode, chunk_size):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


@torch.library.register_fake("linflow::lion_bwd")
def _(q, k, v, g, g_backward, lam, cu_seqlens, grad_o, decay, decay_convention, normalize, eps, scale, mode,
      chunk_size):
    def like(x):
        return torch.empty_like(x) if x is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(g), like(g_backward), like(lam)


def _setup_context(ctx, inputs, output):
    q, k, v, g, g_backward, lam, cu_seqlens, *options = inputs
    ctx.save_for_backward(q, k, v, g, g_backward, lam, cu_seqlens)
    ctx.options = options


def _backward(ctx, grad_o):
    q, k, v, g, g_backward, lam, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dg, dgb, dlam = _bwd(q, k, v, g, g_backward, lam, cu_seqlens, grad_o.contiguous(), *ctx.options)
    return (dq, dk, dv, dg if g is not None else None, dgb if g_backward is not None else None,
            dlam if lam is not None else None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("linflow::lion_fwd", _backward, setup_context=_setup_context)


def _contiguous(x):
    return x.contiguous() if x is not None else None


def lion(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    decay: str = "none",
    lam: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "auto",
    decay_convention: str = "symmetric",
    g_backward: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    r"""Bidirectional (non-causal) linear attention with a decay mask (LION).

    Args:
        q, k: ``[B, T, H, K]``, feature maps already applied (non-negative for ``normalize=True``; any sign with
            ``normalize=False``). v: ``[B, T, H, V]``. fp32, bf16 or fp16 (fp64 on CPU), one dtype.
        g: ``[B, T, H]`` log decay ``<= 0`` (``decay="selective"`` only; e.g. ``logsigmoid(W x + b)``).
        decay: ``"none"`` (LION-lit), ``"fixed"`` (LION-d, needs ``lam``), ``"selective"`` (LION-s, needs ``g``).
        lam: ``[H]`` per-head decay in the open interval (0, 1) (``decay="fixed"`` only).
        normalize: divide by the masked score sum: ``o_i = num_i / (den_i + eps)``.
        eps: added to the denominator (``normalize=True``) so that a vanishing score sum cannot divide by zero;
            it is added after ``scale``, so it is relative to ``scale * sum_j M_ij q_i.k_j``.
        scale: score scale. Default: ``1`` with ``normalize=True`` (the scale cancels in the ratio up to ``eps``),
            ``K ** -0.5`` with ``normalize=False`` (the masked-LM layer's ``d^-1/2``).
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of packed variable-length sequences (requires B = 1); no
            attention crosses a boundary.
        mode: ``"auto"``, ``"chunked"``, ``"full"`` or ``"recurrent"`` (forward only: raises if a gradient is
            required). All modes compute the same function.
        decay_convention: ``"symmetric"`` or ``"lion_code"`` (see the module docstring).
        g_backward: ``[B, T, H]`` separate log decay of the backward direction (``decay="selective"`` only).
        chunk_size: chunk length of ``chunked`` (16, 32, 64 or 128).

    Returns:
        ``o`` ``[B, T, H, V]`` in q's dtype. Gradients flow to q, k, v, g, g_backward and lam.
    """
    if scale is None:
        scale = 1.0 if normalize else q.shape[-1] ** -0.5
    if mode == "recurrent" and torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, g, g_backward, lam)):
        raise RuntimeError("lion: mode='recurrent' is the forward-only inference form (no gradients); use "
                           "mode='chunked' (or 'full' for short sequences) for training, or run under torch.no_grad()")
    q, k, v, g, g_backward, lam = map(_contiguous, (q, k, v, g, g_backward, lam))
    return _fwd(q, k, v, g, g_backward, lam, cu_seqlens, str(decay), str(decay_convention), bool(normalize),
                float(eps), float(scale), str(mode), int(chunk_size))
