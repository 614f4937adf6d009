r"""Rank-R DeltaNet token mixer (DeltaProduct, Siems et al. 2502.10297; ParallelFlow, Cirone & Salvi 2504.00492) on
linflow's rank-R delta rule op. DeltaNet (deltanet.py) with R keys, values and strengths per token:

    q = SiLU(conv(W_q x))   [H, K]          k_j, v_j = SiLU(conv(W_k x)), SiLU(conv(W_v x))   [R, H, K | V]
    beta_j = sigmoid(W_b x)  [R, H]         g = -exp(A_log) * softplus(W_a x + dt_bias)        use_gate only
    o = flow_delta_rule(q, k, v, beta, g, form=form, use_qk_l2norm=True)
    y = W_o RMSNorm(o)   or   W_o (RMSNorm(o) * SiLU(W_g x))   with use_gate
"""
from __future__ import annotations

import math

import torch
from torch import nn

from linflow.nn.deltanet import DeltaNet, DeltaNetState
from linflow.ops.flow import FORMS, SCANS, flow_delta_rule


class FlowDeltaNet(DeltaNet):
    r"""DeltaNet with ``rank`` (key, value, beta) triples per token: ``form="product"`` is (Gated) DeltaProduct,
    ``form="simultaneous"`` is ParallelFlow's rank-R step. ``rank=1`` is :class:`DeltaNet` (chunked op only).

    Args: ``rank`` R >= 1, ``form``, ``scan`` (see :func:`linflow.flow_delta_rule`); the rest as :class:`DeltaNet`.
    ``forward(x [B, T, hidden], cu_seqlens=None, state=None, use_cache=None) -> (y, state)`` as
    :class:`DeltaNet` (the state's conv caches of k and v hold ``R`` times the channels). Decoding runs the
    chunked op on the new tokens (no rank-R decode step yet).
    """

    def __init__(self, hidden_size: int, num_heads: int, rank: int = 2, form: str = "product",
                 scan: str = "sequential", head_dim: int | None = None, use_gate: bool = False,
                 use_short_conv: bool = True, conv_size: int = 4, expand_v: float = 1.0,
                 allow_neg_eigval: bool = False, norm_eps: float = 1e-5, device=None, dtype=None):
        if rank < 1:
            raise ValueError(f"FlowDeltaNet: rank must be >= 1, got {rank}")
        if form not in FORMS or scan not in SCANS:
            raise ValueError(f"FlowDeltaNet: form must be one of {FORMS} and scan one of {SCANS}, "
                             f"got form={form!r}, scan={scan!r}")
        super().__init__(hidden_size, num_heads, head_dim=head_dim, use_gate=use_gate, use_short_conv=use_short_conv,
                         conv_size=conv_size, expand_v=expand_v, allow_neg_eigval=allow_neg_eigval,
                         norm_eps=norm_eps, device=device, dtype=dtype)
        self.rank, self.form, self.scan = rank, form, scan
        fk = dict(device=device, dtype=dtype)
        # R triples per token: widen DeltaNet's k / v / beta projections (and k / v convolutions) R times.
        self.k_proj = nn.Linear(hidden_size, rank * self.key_dim, bias=False, **fk)
        self.v_proj = nn.Linear(hidden_size, rank * self.value_dim, bias=False, **fk)
        self.b_proj = nn.Linear(hidden_size, rank * num_heads, bias=False, **fk)
        if use_short_conv:
            bound = 1 / math.sqrt(conv_size)
            for name, c in (("k_conv", rank * self.key_dim), ("v_conv", rank * self.value_dim)):
                self.register_parameter(name, nn.Parameter(torch.empty(c, conv_size, **fk).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, state: DeltaNetState | None = None,
                use_cache: bool | None = None) -> tuple[torch.Tensor, DeltaNetState | None]:
        B, T, _ = x.shape
        H, K, V, R = self.num_heads, self.head_dim, self.head_v_dim, self.rank
        use_cache = state is not None if use_cache is None else use_cache
        q, k, v, beta, g, (cq, ck, cv) = self._features(x, cu_seqlens, state)
        o, recurrent = flow_delta_rule(q.view(B, T, H, K), k.view(B, T, R, H, K), v.view(B, T, R, H, V),
                                       beta.view(B, T, R, H), g, form=self.form, scan=self.scan,
                                       initial_state=state.recurrent if state is not None else None,
                                       output_final_state=use_cache, cu_seqlens=cu_seqlens, use_qk_l2norm=True)
        return self._output(o, x), (DeltaNetState(recurrent, cq, ck, cv) if use_cache else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, form={self.form!r}, scan={self.scan!r}"
