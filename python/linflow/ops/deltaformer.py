r"""Deltaformer (ALGORITHMS.md §3): a delta rule in the feature space of the softmax kernel, read by causal softmax
attention.

    u_1 = v_1;   u_i = v_i - beta_i sum_{j<i} p_ij u_j,   p_ij = softmax_{j<i}(s w_i.k_j)     (write, KV heads)
    o_i = sum_{j<=i} softmax_j(s q_i.k_j) u_j                                                (read, query heads)

Computed in chunk form by C++ (`torch.ops.linflow.deltaformer_fwd/bwd`, csrc/deltaformer/): per chunk of rows an
online log-sum-exp over key blocks, the attention onto all earlier u, and a forward substitution of the chunk's
unit-lower-triangular system; then blocked causal attention. The backward solves the transposed system chunk by
chunk in reverse, visiting each (i, j) pair once, from the stored ``r = P u`` and log-sum-exps. All arithmetic in
fp32 (fp64 for fp64 inputs). CUDA tensors run the same device-generic ATen form until dedicated kernels land.
Autograd, fake (meta) kernels and torch.compile support are registered here.
"""
from __future__ import annotations

import torch

from linflow import _C_loader  # noqa: F401  (registers the ops)

_fwd = torch.ops.linflow.deltaformer_fwd
_bwd = torch.ops.linflow.deltaformer_bwd


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("linflow::deltaformer_fwd")
def _(q, k, v, beta, w, cu_seqlens, scale, chunk_size):
    B, T, H, _ = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    acc = _acc_dtype(q)
    return (q.new_empty((B, T, H, V)), q.new_empty((B, T, Hkv, V), dtype=acc), q.new_empty((B, T, Hkv, V), dtype=acc),
            q.new_empty((B, T, Hkv), dtype=acc), q.new_empty((B, T, H), dtype=acc))


@torch.library.register_fake("linflow::deltaformer_bwd")
def _(q, k, v, beta, w, cu_seqlens, o, u, r, lse_w, lse_o, grad_o, grad_u, scale, chunk_size):
    dbeta = torch.empty_like(beta) if beta is not None else q.new_empty((0,))
    dw = torch.empty_like(w) if w is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbeta, dw


def _setup_context(ctx, inputs, output):
    q, k, v, beta, w, cu_seqlens, scale, chunk_size = inputs
    o, u, r, lse_w, lse_o = output
    ctx.save_for_backward(q, k, v, beta, w, cu_seqlens, o, u, r, lse_w, lse_o)
    ctx.scale, ctx.chunk_size = scale, chunk_size
    ctx.mark_non_differentiable(r, lse_w, lse_o)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_o, grad_u, grad_r, grad_lse_w, grad_lse_o):
    q, k, v, beta, w, cu_seqlens, o, u, r, lse_w, lse_o = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv, dbeta, dw = _bwd(q, k, v, beta, w, cu_seqlens, o, u, r, lse_w, lse_o, grad_o.contiguous(),
                                 grad_u.contiguous() if grad_u is not None else None, ctx.scale, ctx.chunk_size)
    return (dq, dk, dv, dbeta if beta is not None else None, dw if w is not None else None, None, None, None)


torch.library.register_autograd("linflow::deltaformer_fwd", _backward, setup_context=_setup_context)


def _contiguous(x):
    return x.contiguous() if x is not None else None


def deltaformer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    return_u: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Deltaformer attention (Deltaformer, arXiv 2505.19488): causal softmax attention over pseudo-values ``u``
    written by a delta rule with a softmax kernel.

    Args:
        q: ``[B, T, H, K]`` read queries; fp32, bf16 or fp16 (fp64 on CPU).
        k: ``[B, T, Hkv, K]`` keys, ``H % Hkv == 0`` (grouped-query attention: query head ``h`` reads KV head
            ``h // (H // Hkv)``). v: ``[B, T, Hkv, V]``. q, k, v share one dtype.
        beta: ``[B, T, Hkv]`` write strength per KV head (any float dtype; None: 1). The write pass runs on the KV
            heads, so ``beta`` (like ``w``) has one value per KV head. Usually in (0, 1]; larger values are legal
            (the write system is then less well conditioned).
        w: ``[B, T, Hkv, K]`` write queries, q's dtype; None: ``w = k`` (the paper's key-key write). Pass ``q``
            (with ``H = Hkv``) for fla's query-key write.
        scale: softmax scale ``s`` of both the write and the read pass, default ``K ** -0.5``.
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of packed variable-length sequences (requires B = 1).
        chunk_size: 16, 32 or 64 (rows per step of the chunked write pass; the result does not depend on it).
        return_u: also return the pseudo-values ``u``.

    Returns:
        ``o`` ``[B, T, H, V]`` in q's dtype; with ``return_u``, ``(o, u)`` with ``u`` ``[B, T, Hkv, V]`` in fp32
        (fp64 for fp64 inputs), differentiable.

    On CUDA this runs the device-generic ATen chunk form (cuBLAS GEMMs, a loop over chunks) until dedicated kernels
    land.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v, beta, w = map(_contiguous, (q, k, v, beta, w))
    o, u, _, _, _ = _fwd(q, k, v, beta, w, cu_seqlens, float(scale), int(chunk_size))
    return (o, u) if return_u else o
