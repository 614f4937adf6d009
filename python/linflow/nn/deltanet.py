r"""DeltaNet / Gated DeltaNet token mixer (Yang et al. 2406.06484, 2412.06464) on linflow's delta rule op.

    q, k, v = SiLU(conv(W_q x)), SiLU(conv(W_k x)), SiLU(conv(W_v x))     short causal depthwise conv per channel
    beta    = sigmoid(W_b x)                                               (x 2 with allow_neg_eigval)
    g       = -exp(A_log) * softplus(W_a x + dt_bias)                      use_gate only (else no decay)
    o       = delta_rule(q, k, v, beta, g, use_qk_l2norm=True)             per head
    y       = W_o RMSNorm(o)                  or  W_o (RMSNorm(o) * SiLU(W_g x))   with use_gate
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from linflow.ops.delta_rule import delta_rule, delta_rule_step


class DeltaNetState(NamedTuple):
    """Decoding cache of one DeltaNet layer, N = batch size (or number of packed sequences).

    recurrent: ``[N, H, K, V]`` fp32 delta-rule state. conv_q / conv_k / conv_v: ``[N, conv_size - 1, channels]``,
    the last inputs of each short convolution (None without ``use_short_conv``).
    """
    recurrent: torch.Tensor
    conv_q: torch.Tensor | None = None
    conv_k: torch.Tensor | None = None
    conv_v: torch.Tensor | None = None


def _token_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed sequences: each token's sequence index and position inside its sequence (no host sync)."""
    t = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.long)
    seq = torch.searchsorted(cu[1:], t, right=True)
    return seq, t - cu[seq]


def short_conv(x: torch.Tensor, weight: torch.Tensor, cache: torch.Tensor | None = None,
               cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Causal depthwise convolution ``y_t = sum_s weight[:, W-1-s] * x_{t-s}`` (s = 0..W-1) over each sequence.

    Args:
        x: ``[B, T, C]``. weight: ``[C, W]``.
        cache: ``[N, W-1, C]``, the inputs before ``x`` of each sequence (zeros if None).
        cu_seqlens: ``[N + 1]`` offsets of packed sequences in ``x`` (B = 1); no input crosses a boundary.

    Returns:
        ``(y [B, T, C], new_cache [N, W-1, C])``: the last ``W-1`` inputs of each sequence, cache included.
    """
    B, T, C = x.shape
    W = weight.shape[1]
    weight = weight.to(x.dtype)
    if cu_seqlens is None:
        past = cache if cache is not None else x.new_zeros(B, W - 1, C)
        xp = torch.cat([past.to(x.dtype), x], dim=1)                      # [B, W-1+T, C]
        y = sum(xp[:, W - 1 - s:W - 1 - s + T] * weight[:, W - 1 - s] for s in range(W))
        return y, xp[:, xp.shape[1] - (W - 1):]
    # Packed sequences: gather each shifted input from x or, before a sequence's start, from its cache row.
    N = cu_seqlens.shape[0] - 1
    past = cache if cache is not None else x.new_zeros(N, W - 1, C)
    src = torch.cat([past.to(x.dtype).reshape(N * (W - 1), C), x[0]], dim=0)  # cache rows first, then tokens
    seq, pos = _token_positions(cu_seqlens, T)
    starts = cu_seqlens.to(torch.long)[:-1]
    lengths = cu_seqlens.to(torch.long)[1:] - starts

    def index(seq_id, start, p):
        # row of src holding input at position p (< 0: from the cache) of sequence seq_id
        return torch.where(p >= 0, N * (W - 1) + start + p, seq_id * (W - 1) + (W - 1) + p)

    token_start = starts[seq]
    y = sum(src[index(seq, token_start, pos - s)] * weight[:, W - 1 - s] for s in range(W))
    r = torch.arange(W - 1, device=x.device)
    n = torch.arange(N, device=x.device)
    tail = lengths[:, None] - (W - 1) + r                                   # [N, W-1] positions of the new cache
    new_cache = src[index(n[:, None], starts[:, None], tail)]
    return y[None], new_cache


class DeltaNet(nn.Module):
    r"""DeltaNet token mixer; Gated DeltaNet with ``use_gate=True``.

    Args:
        hidden_size: model width. num_heads: heads H.
        head_dim: key dim K per head (default ``hidden_size // num_heads``); value dim per head is
            ``int(head_dim * expand_v)``.
        use_gate: Gated DeltaNet: per-head decay ``g = -exp(A_log) * softplus(W_a x + dt_bias)`` and a SiLU output
            gate on the normalised output.
        use_short_conv, conv_size: short causal depthwise convolutions on q, k, v (followed by SiLU).
        expand_v: value expansion.
        allow_neg_eigval: ``beta = 2 * sigmoid(.)`` in (0, 2).
        norm_eps: RMSNorm epsilon. chunk_size: chunk size of the op (16, 32, 64).
        decode_max_tokens: with a ``state``, inputs of at most this many tokens (and no ``cu_seqlens``) run the
            recurrent decode step instead of the chunked op, outside autograd.

    ``forward(x [B, T, hidden], cu_seqlens=None, state=None, use_cache=None) -> (y [B, T, hidden], state)``.
    ``state`` (a :class:`DeltaNetState`, one row per sequence: ``B``, or ``N`` with ``cu_seqlens``) continues
    earlier tokens; a state is returned when one was given or ``use_cache=True``, else None. The decode step
    updates the given state's tensors in place and returns them; always continue from the returned state.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None, use_gate: bool = False,
                 use_short_conv: bool = True, conv_size: int = 4, expand_v: float = 1.0,
                 allow_neg_eigval: bool = False, norm_eps: float = 1e-5, chunk_size: int = 64,
                 decode_max_tokens: int = 16, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        head_v_dim = int(head_dim * expand_v)
        if head_dim < 1 or head_v_dim < 1 or head_v_dim != head_dim * expand_v:
            raise ValueError(f"DeltaNet: head_dim={head_dim} and expand_v={expand_v} must give whole, positive "
                             f"key and value head dims")
        if use_short_conv and conv_size < 2:
            raise ValueError(f"DeltaNet: conv_size must be >= 2, got {conv_size}")
        self.hidden_size, self.num_heads, self.head_dim, self.head_v_dim = hidden_size, num_heads, head_dim, head_v_dim
        self.key_dim, self.value_dim = num_heads * head_dim, num_heads * head_v_dim
        self.use_gate, self.use_short_conv, self.conv_size = use_gate, use_short_conv, conv_size
        self.allow_neg_eigval, self.chunk_size, self.decode_max_tokens = allow_neg_eigval, chunk_size, decode_max_tokens

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **fk)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **fk)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **fk)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False, **fk)
        if use_short_conv:
            # [channels, conv_size] depthwise kernels; same init as nn.Conv1d(groups=channels)
            bound = 1 / math.sqrt(conv_size)
            for name, c in (("q_conv", self.key_dim), ("k_conv", self.key_dim), ("v_conv", self.value_dim)):
                self.register_parameter(name, nn.Parameter(torch.empty(c, conv_size, **fk).uniform_(-bound, bound)))
        if use_gate:
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False, **fk)
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **fk)
            # Mamba-2 init: A ~ U(1, 16); softplus(dt_bias) = dt ~ logU(1e-3, 1e-1)
            self.A_log = nn.Parameter(torch.empty(num_heads, device=device).uniform_(1, 16).log())
            dt = torch.exp(torch.rand(num_heads, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            self.A_log._no_weight_decay = True
            self.dt_bias._no_weight_decay = True
        self.o_norm = nn.RMSNorm(head_v_dim, eps=norm_eps, **fk)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **fk)

    def init_state(self, batch_size: int, device=None, dtype=None) -> DeltaNetState:
        """An empty (zero) state for ``batch_size`` sequences."""
        device = device if device is not None else self.q_proj.weight.device
        dtype = dtype if dtype is not None else self.q_proj.weight.dtype
        rec = torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_v_dim, device=device,
                          dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        if not self.use_short_conv:
            return DeltaNetState(rec)
        W = self.conv_size - 1
        return DeltaNetState(rec, *(torch.zeros(batch_size, W, w.shape[0], device=device, dtype=dtype)
                                    for w in (self.q_conv, self.k_conv, self.v_conv)))

    def _mix(self, x, weight, cache, cu_seqlens):
        if weight is None:
            return F.silu(x), None
        y, new_cache = short_conv(x, weight, cache, cu_seqlens)
        return F.silu(y), new_cache

    def _features(self, x, cu_seqlens, state):
        """The op's inputs before the head split: q, k, v ``[B, T, channels]`` (projected, short-convolved, SiLU),
        beta ``[B, T, b_proj outputs]`` and g ``[B, T, H]`` (None without ``use_gate``), in fp32; and the new
        convolution caches ``(cq, ck, cv)``."""
        conv = (self.q_conv, self.k_conv, self.v_conv) if self.use_short_conv else (None, None, None)
        caches = (state.conv_q, state.conv_k, state.conv_v) if state is not None else (None, None, None)
        q, cq = self._mix(self.q_proj(x), conv[0], caches[0], cu_seqlens)
        k, ck = self._mix(self.k_proj(x), conv[1], caches[1], cu_seqlens)
        v, cv = self._mix(self.v_proj(x), conv[2], caches[2], cu_seqlens)
        beta = torch.sigmoid(self.b_proj(x).float())
        if self.allow_neg_eigval:
            beta = beta * 2
        g = None
        if self.use_gate:
            g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return q, k, v, beta, g, (cq, ck, cv)

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y = W_o RMSNorm(o)`` (times ``SiLU(W_g x)`` with ``use_gate``) for ``o [B, T, H, V]``."""
        B, T = x.shape[:2]
        o = self.o_norm(o)
        if self.use_gate:
            o = o * F.silu(self.g_proj(x).view(B, T, self.num_heads, self.head_v_dim))
        return self.o_proj(o.reshape(B, T, self.value_dim))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, state: DeltaNetState | None = None,
                use_cache: bool | None = None) -> tuple[torch.Tensor, DeltaNetState | None]:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_dim, self.head_v_dim
        use_cache = state is not None if use_cache is None else use_cache
        q, k, v, beta, g, (cq, ck, cv) = self._features(x, cu_seqlens, state)
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
        caches = (state.conv_q, state.conv_k, state.conv_v) if state is not None else (None, None, None)

        decode = (state is not None and cu_seqlens is None and T <= self.decode_max_tokens
                  and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())))
        if decode:
            recurrent = state.recurrent
            o = delta_rule_step(q, k, v, beta, recurrent, g, use_qk_l2norm=True)
            if self.use_short_conv:
                for old, new in zip(caches, (cq, ck, cv)):
                    old.copy_(new)
                cq, ck, cv = caches
        else:
            o, recurrent = delta_rule(q, k, v, beta, g, initial_state=state.recurrent if state is not None else None,
                                      output_final_state=use_cache, cu_seqlens=cu_seqlens, use_qk_l2norm=True,
                                      chunk_size=self.chunk_size)
        return self._output(o, x), (DeltaNetState(recurrent, cq, ck, cv) if use_cache else None)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"head_v_dim={self.head_v_dim}, use_gate={self.use_gate}, use_short_conv={self.use_short_conv}, "
                f"conv_size={self.conv_size}")
