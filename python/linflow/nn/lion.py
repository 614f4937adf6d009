r"""LION bidirectional linear-attention layer (Afzal et al., arXiv 2502.16249; ALGORITHMS.md §4) on linflow.lion.

A drop-in for the self-attention block of a bidirectional encoder:

    q, k = phi(W_q x), phi(W_k x)          per head; phi = elu + 1 (LION-lit) or normalised SiLU + 0.5 (LION-d / -s)
    v    = W_v x
    lam  = sigmoid(a_h)                    decay="fixed"      (one learned decay per head)
    g    = logsigmoid(W_g x + b)           decay="selective"  (per token and head)
    y    = W_o lion(q, k, v, ...)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linflow.ops.lion import lion

FEATURE_MAPS = ("elu", "silu_norm", "identity")


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``elu``: elu(x) + 1 (> 0). ``silu_norm``: (SiLU(x) + 0.5) / ||SiLU(x) + 0.5|| over the head dim (SiLU >= -0.278,
    so the entries are > 0). ``identity``: x (with ``normalize=False``: the authors' masked-LM layer)."""
    if kind == "elu":
        return F.elu(x) + 1
    if kind == "silu_norm":
        y = F.silu(x) + 0.5
        return y / y.norm(dim=-1, keepdim=True)
    if kind == "identity":
        return x
    raise ValueError(f"LION: feature_map must be one of {FEATURE_MAPS}, got {kind!r}")


class LION(nn.Module):
    r"""LION token mixer: bidirectional linear attention with a decay mask.

    Args:
        hidden_size: model width. num_heads: heads H.
        decay: ``"none"`` (LION-lit), ``"fixed"`` (LION-d: ``lam = sigmoid(a_h)`` per head) or ``"selective"``
            (LION-s: ``g = logsigmoid(W_g x + b)`` per token and head).
        feature_map: ``"elu"``, ``"silu_norm"`` or ``"identity"``; default ``"elu"`` for LION-lit and
            ``"silu_norm"`` for LION-d / -s (the authors' vision layers).
        head_dim: key / value dim per head (default ``hidden_size // num_heads``).
        normalize: divide by the masked score sum (needs a non-negative feature map); ``False`` with
            ``feature_map="identity"`` is the authors' masked-LM layer (scores scaled by ``head_dim ** -0.5``).
        decay_convention: ``"symmetric"`` (default) or ``"lion_code"`` (the authors' released code), see
            :func:`linflow.lion`.
        eps, mode, chunk_size: passed to :func:`linflow.lion`.
        bias: biases of the q / k / v / output projections.

    ``forward(x [B, T, hidden], attention_mask=None) -> y [B, T, hidden]``. ``attention_mask`` ``[B, T]`` (bool or
    0/1, 1 = a real token) marks padding, anywhere in the sequence: a padded token gets no attention, is transparent
    to the decays (its gate is 1, and LION-d runs as LION-s with ``g = log lam`` on real tokens), and its output is
    zero, so every sequence of a padded batch gives what it gives alone. Static shapes, no host sync:
    ``torch.compile(fullgraph=True)`` works.
    """

    def __init__(self, hidden_size: int, num_heads: int, decay: str = "selective", feature_map: str | None = None,
                 head_dim: int | None = None, normalize: bool = True, decay_convention: str = "symmetric",
                 eps: float = 1e-6, mode: str = "auto", chunk_size: int = 64, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        if decay not in ("none", "fixed", "selective"):
            raise ValueError(f"LION: decay must be 'none', 'fixed' or 'selective', got {decay!r}")
        feature_map = feature_map if feature_map is not None else ("elu" if decay == "none" else "silu_norm")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"LION: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        if normalize and feature_map == "identity":
            raise ValueError("LION: normalize=True needs a non-negative feature map ('elu' or 'silu_norm'); "
                             "use normalize=False with feature_map='identity'")
        head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        if head_dim < 1:
            raise ValueError(f"LION: head_dim must be >= 1, got {head_dim}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.decay, self.feature_map, self.normalize = decay, feature_map, normalize
        self.decay_convention, self.eps, self.mode, self.chunk_size = decay_convention, eps, mode, chunk_size
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=bias, **fk)
        self.k_proj = nn.Linear(hidden_size, inner, bias=bias, **fk)
        self.v_proj = nn.Linear(hidden_size, inner, bias=bias, **fk)
        self.o_proj = nn.Linear(inner, hidden_size, bias=bias, **fk)
        if decay == "fixed":
            # lam_h = 1 - 2^-(2 + 5 h / H): from 0.75 to ~0.99, short and long ranges across heads (RetNet-like)
            lam = 1 - 2.0 ** -(2 + 5 * torch.arange(num_heads, dtype=torch.float64) / max(num_heads, 1))
            a_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 even in a bf16 model
            self.a = nn.Parameter(torch.logit(lam).to(device=device, dtype=a_dtype))
            self.a._no_weight_decay = True
        elif decay == "selective":
            self.g_proj = nn.Linear(hidden_size, num_heads, bias=True, **fk)
            with torch.no_grad():  # initial decays sigmoid(b) in (0.88, 0.99)
                self.g_proj.weight.mul_(0.1)
                self.g_proj.bias.uniform_(2.0, 4.6)

    def lam(self) -> torch.Tensor:
        """Per-head decay ``sigmoid(a)`` (fp32, or fp64 for an fp64 layer), kept strictly below 1 for the op's
        (0, 1) contract."""
        a = self.a if self.a.dtype == torch.float64 else self.a.float()
        return torch.sigmoid(a).clamp(max=1 - 2.0**-20)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q = feature_map(self.q_proj(x).view(B, T, H, D), self.feature_map)
        k = feature_map(self.k_proj(x).view(B, T, H, D), self.feature_map)
        v = self.v_proj(x).view(B, T, H, D)
        keep = None
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"LION: attention_mask must be [B, T] = [{B}, {T}], got {tuple(attention_mask.shape)}")
            keep = attention_mask.to(torch.bool)
            k = k * keep[..., None, None].to(k.dtype)  # a padded key gets no weight (num and den)
            v = v * keep[..., None, None].to(v.dtype)
        decay, g, lam = self.decay, None, None
        if self.decay == "selective":
            z = self.g_proj(x)
            g = F.logsigmoid(z if z.dtype == torch.float64 else z.float())
            if keep is not None:
                g = g * keep[..., None]  # decay 1 on padding: transparent
        elif self.decay == "fixed":
            lam = self.lam()
            if keep is not None:  # positions no longer count padding: the same mask as per-token gates log(lam)
                decay, g, lam = "selective", lam.log()[None, None, :] * keep[..., None].to(lam.dtype), None
        o = lion(q, k, v, g, decay=decay, lam=lam, normalize=self.normalize, eps=self.eps,
                 decay_convention=self.decay_convention, mode=self.mode, chunk_size=self.chunk_size)
        if keep is not None:
            o = o * keep[..., None, None].to(o.dtype)
        return self.o_proj(o.reshape(B, T, H * D))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"decay={self.decay!r}, feature_map={self.feature_map!r}, normalize={self.normalize}, "
                f"decay_convention={self.decay_convention!r}")
