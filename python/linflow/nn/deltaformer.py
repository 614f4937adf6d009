r"""Deltaformer attention layer (arXiv 2505.19488) on linflow's deltaformer op: a drop-in causal self-attention.

    q = W_q x  (H heads),  k = W_k x,  v = W_v x  (Hkv heads),  beta = sigmoid(W_b x)  (one per KV head;
                                                                   x 2 with allow_neg_eigval)
    w = W_w x  (use_write_proj) or k                             (the write query; the paper compares keys with keys)
    q, k, w <- RoPE(.)   (rope_theta not None; positions restart at every packed sequence)
    u_i = v_i - beta_i sum_{j<i} softmax_{j<i}(s w_i.k_j) u_j,   o = causal_softmax_attention(q, k, u)
    y   = W_o o
"""
from __future__ import annotations

import torch
from torch import nn

from linflow.ops.deltaformer import deltaformer


def _positions(T: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return t
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seq = torch.searchsorted(cu[1:], t, right=True)
    return t - cu[seq]


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half convention) of ``x`` ``[B, T, H, D]`` at ``positions`` ``[T]``."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]                  # [T, D/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    xf = x.float() if x.dtype != torch.float64 else x
    x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Deltaformer(nn.Module):
    r"""Deltaformer token mixer: causal self-attention whose values are written by a softmax-kernel delta rule.

    Args:
        hidden_size: model width. num_heads: query heads H. num_kv_heads: key/value heads (default H; must divide
            H); the write pass (and beta) runs on the KV heads.
        head_dim: per-head dim (default ``hidden_size // num_heads``).
        use_write_proj: a separate write-query projection ``w`` (default: ``w = k``, the paper's key-key write).
        qkv_bias: biases on the q / k / v (/ w) projections.
        rope_theta: rotary embedding base for q, k, w; None: no positional embedding (the write pass is
            order-aware by itself).
        allow_neg_eigval: ``beta = 2 sigmoid(.)`` in (0, 2) (as DeltaNet's option: with the linear kernel,
            ``beta = 2`` turns a write into a reflection, e.g. a swap of two slots).
        chunk_size: chunk size of the op (16, 32, 64).

    ``forward(x [B, T, hidden], cu_seqlens=None) -> y [B, T, hidden]``; with ``cu_seqlens`` (B = 1) the packed
    sequences do not see each other.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 use_write_proj: bool = False, qkv_bias: bool = False, rope_theta: float | None = 10000.0,
                 allow_neg_eigval: bool = False, chunk_size: int = 64, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"Deltaformer: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        if head_dim < 1 or (rope_theta is not None and head_dim % 2 != 0):
            raise ValueError(f"Deltaformer: head_dim={head_dim} must be positive (and even with rotary embeddings)")
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.use_write_proj, self.rope_theta, self.chunk_size = use_write_proj, rope_theta, chunk_size
        self.allow_neg_eigval = allow_neg_eigval
        q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, q_dim, bias=qkv_bias, **fk)
        self.k_proj = nn.Linear(hidden_size, kv_dim, bias=qkv_bias, **fk)
        self.v_proj = nn.Linear(hidden_size, kv_dim, bias=qkv_bias, **fk)
        self.w_proj = nn.Linear(hidden_size, kv_dim, bias=qkv_bias, **fk) if use_write_proj else None
        self.b_proj = nn.Linear(hidden_size, num_kv_heads, bias=True, **fk)
        self.o_proj = nn.Linear(q_dim, hidden_size, bias=False, **fk)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, Hkv, D)
        w = self.w_proj(x).view(B, T, Hkv, D) if self.w_proj is not None else None
        beta = torch.sigmoid(self.b_proj(x).float())
        if self.allow_neg_eigval:
            beta = beta * 2
        if self.rope_theta is not None:
            pos = _positions(T, cu_seqlens, x.device)
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
            w = rotary(w, pos, self.rope_theta) if w is not None else None
        o = deltaformer(q, k, v, beta, w, cu_seqlens=cu_seqlens, chunk_size=self.chunk_size)
        return self.o_proj(o.reshape(B, T, H * D))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, use_write_proj={self.use_write_proj}, rope_theta={self.rope_theta}, "
                f"allow_neg_eigval={self.allow_neg_eigval}")
