r"""The flow scan (ALGORITHMS.md §2, issue #3): the state pass of the (rank-R) delta rule as a parallel scan over
segments instead of one loop over every chunk, built from the chunk op itself.

A segment (``L`` tokens of one sequence) maps its incoming state affinely, ``S_out = A S_in + B``. Three steps:

  1. every segment's map at once: one run of the op over all segments (packed as variable-length sequences) on the
     augmented value ``[0 | v]`` (K + V columns) from the initial state ``[I | 0]``: by linearity its final state
     is ``[A | B]`` (``A`` is the homogeneous part, ``B`` the map of a zero state);
  2. the incoming state of every segment from the prefix compositions of the maps (a log-depth scan over the
     segment index, batched over sequences and heads);
  3. the outputs: one more run over all segments, each from its incoming state.

Steps 1 and 3 use every chunk of every segment in parallel, so a single long sequence fills the GPU; both run the
op's own (tested) kernels, and autograd differentiates the composition (the backward runs the op's backward over
segments, in parallel, and the scan's transpose). The result equals the sequential pass up to rounding.
"""
from __future__ import annotations

import math

import torch

_fwd = torch.ops.linflow.flow_fwd

CHUNK = 64

# scan="auto": the segment scan when a few long sequences leave most of the GPU idle in the sequential pass.
# Measured on the H100 (bf16, K = V = 128, fwd+bwd): 1 x 4 heads x T 262144: parallel 1.87x faster than sequential;
# 1 x 16 heads x T 65536: sequential 1.5x faster (benchmarks/bench_flow.py, README "Which scan").
AUTO_MAX_SEQ_HEADS = 8
AUTO_MIN_TOKENS = 32768


def resolve_scan(scan: str, q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> str:
    """``scan`` with ``"auto"`` decided from shapes alone (no device read): ``"parallel"`` on CUDA when sequences x
    heads <= AUTO_MAX_SEQ_HEADS and the mean sequence is >= AUTO_MIN_TOKENS tokens, else ``"sequential"``."""
    if scan != "auto":
        return scan
    B, T, H = q.shape[:3]
    n_seq = B if cu_seqlens is None else max(1, cu_seqlens.shape[0] - 1)
    long_enough = B * T / n_seq >= AUTO_MIN_TOKENS
    return "parallel" if q.is_cuda and n_seq * H <= AUTO_MAX_SEQ_HEADS and long_enough else "sequential"


def segment_length(n_seq: int, H: int, T: int, device: torch.device, segment: int | None) -> int:
    """Tokens per segment (a multiple of the chunk): ``segment`` if given; else on CUDA about four independent
    (segment, head) passes per multiprocessor, on CPU 8 segments a sequence."""
    if segment is not None:
        if segment < 1:
            raise ValueError(f"segment must be >= 1 token, got {segment}")
        return math.ceil(segment / CHUNK) * CHUNK
    chunks = max(1, math.ceil(T / CHUNK))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        per_seq = max(1, math.ceil(4 * sms / max(1, n_seq * H)))
    else:
        per_seq = 8
    return math.ceil(chunks / min(chunks, per_seq)) * CHUNK


def flow_segment_scan(q, k, v, beta, g, initial_state, cu_seqlens, scale: float, output_final_state: bool,
                      form: str, segment: int | None = None):
    """flow_fwd with scan="sequential" semantics, computed by the segment scan. Shapes as flow_fwd
    (q [B, T, H, K], k [B, T, R, H, K], v [B, T, R, H, V], beta [B, T, R, H], g [B, T, H])."""
    B, T, H, K = q.shape
    R, V = k.shape[2], v.shape[-1]
    dev = q.device
    if cu_seqlens is None:
        bounds = [(b * T, (b + 1) * T) for b in range(B)]
    else:
        offs = [int(x) for x in cu_seqlens.tolist()]  # one host read: the segments depend on the lengths
        bounds = list(zip(offs[:-1], offs[1:]))
    N = len(bounds)
    L = segment_length(N, H, max((e - s for s, e in bounds), default=0), dev, segment)
    seg_start, seg_seq, seg_idx = [], [], []
    for n, (s, e) in enumerate(bounds):
        for i, t0 in enumerate(range(s, e, L)):
            seg_start.append(t0)
            seg_seq.append(n)
            seg_idx.append(i)
    total = B * T
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    h0 = (initial_state.to(state_dtype) if initial_state is not None
          else torch.zeros(N, H, K, V, device=dev, dtype=state_dtype))
    if not seg_start:  # no tokens at all
        return q.new_zeros(B, T, H, V), h0
    cu_seg = torch.tensor(seg_start + [total], device=dev, dtype=torch.int64)
    S = len(seg_start)
    qp, kp, vp = q.reshape(1, total, H, K), k.reshape(1, total, R, H, K), v.reshape(1, total, R, H, V)
    bp = beta.reshape(1, total, R, H)
    gp = g.reshape(1, total, H) if g is not None else None

    # 1. every segment's affine map: final state of [0 | v] from [I | 0]
    ident = torch.eye(K, device=dev, dtype=state_dtype)
    eye = ident.expand(S, H, K, K)
    if K + V <= 256:
        v_aug = torch.cat([vp.new_zeros(1, total, R, H, K), vp], dim=-1)
        h_aug = torch.cat([eye, eye.new_zeros(S, H, K, V)], dim=-1)
        _, maps = _fwd(qp, kp, v_aug, bp, gp, h_aug.contiguous(), cu_seg, scale, True, form, "sequential")
        A, Bm = maps[..., :K], maps[..., K:]
    else:  # head dims beyond the kernels' 256 columns: the two halves separately
        _, A = _fwd(qp, kp, vp.new_zeros(1, total, R, H, K), bp, gp, eye.contiguous(), cu_seg, scale, True, form,
                    "sequential")
        _, Bm = _fwd(qp, kp, vp, bp, gp, None, cu_seg, scale, True, form, "sequential")

    # 2. incoming state of every segment: the prefix compositions of the maps along each sequence, by a log-depth
    # (Hillis-Steele) scan over the segment index, sequences padded to the same count with identity maps; the
    # index lists come from the host (no device-to-host read).
    m = max(seg_idx) + 1
    flat = torch.tensor([seg_seq[j] * m + seg_idx[j] for j in range(S)], device=dev, dtype=torch.int64)
    P = ident.expand(N * m, H, K, K).index_copy(0, flat, A)
    Q = torch.zeros(N * m, H, K, V, device=dev, dtype=state_dtype).index_copy(0, flat, Bm)
    P, Q = P.view(N, m, H, K, K), Q.view(N, m, H, K, V)
    d = 1
    while d < m:  # (P, Q)[i] <- (P, Q)[i] o (P, Q)[i - d]
        Q = torch.cat([Q[:, :d], torch.matmul(P[:, d:], Q[:, :-d]) + Q[:, d:]], dim=1)
        P = torch.cat([P[:, :d], torch.matmul(P[:, d:], P[:, :-d])], dim=1)
        d *= 2
    after = torch.matmul(P, h0.unsqueeze(1)) + Q  # the state after segment i of each sequence
    s_in = torch.cat([h0.unsqueeze(1), after[:, :-1]], dim=1).reshape(N * m, H, K, V).index_select(0, flat)
    state = after[:, -1]  # padding maps are the identity: the final state (h0 for an empty sequence)

    # 3. the outputs, every segment from its incoming state
    o, _ = _fwd(qp, kp, vp, bp, gp, s_in, cu_seg, scale, False, form, "sequential")
    return o.reshape(B, T, H, V), state
