"""The CUDA decode-step kernel (csrc/delta_rule/step_cuda.cu) against the ATen path on CPU copies.

The CPU op (step_aten) is the reference: same fp32 state and accumulation, so o differs by at most the final rounding
to q's dtype plus fp32 summation order, and the state by fp32 summation order. Padding rows (state_indices < 0) exist
only in the CUDA kernel: the reference runs the other rows and expects o = 0 and an untouched cache for them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import linflow  # noqa: F401  (registers torch.ops.linflow)

step = torch.ops.linflow.delta_rule_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (rtol, atol) on o: about one unit in the last place of the output dtype, fp32 summation noise for fp32.
O_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2**-7, 1e-2), torch.float16: (2**-9, 2e-3)}
STATE_TOL = (1e-4, 1e-4)  # the state is fp32 on both sides, whatever q's dtype

SHAPES = [(16, 16), (128, 128), (256, 256), (100, 36), (64, 130)]  # (K, V); 130: V % 4 != 0, scalar state path
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(B, T, H, K, V, dtype, gated, seed=0, beta_dtype=None, g_dtype=None):
    """CPU inputs: unit-norm keys and beta in (0, 1), so states stay bounded over the tokens."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    beta = torch.rand(B, T, H, generator=gen).to(beta_dtype or dtype)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2).to(g_dtype or dtype) if gated else None
    return q, k, v, beta, g


def make_cache(N, H, K, V, seed=1):
    return torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(seed))


def reference(q, k, v, beta, g, state, state_indices, scale):
    """ATen path on CPU copies. Returns (o, updated copy of state); padding rows get o = 0 and leave state alone."""
    q, k, v, beta = q.cpu(), k.cpu(), v.cpu(), beta.cpu()
    g = g.cpu() if g is not None else None
    state = state.cpu().clone()
    if state_indices is None:
        return step(q, k, v, beta, g, state, None, scale), state
    idx = state_indices.cpu()
    o = torch.zeros(v.shape, dtype=v.dtype)
    rows = (idx >= 0).nonzero().flatten()
    if rows.numel() > 0:
        # int64: step_aten's index_copy_ takes no int32 index (the CUDA kernel takes both)
        o[rows] = step(q[rows], k[rows], v[rows], beta[rows], g[rows] if g is not None else None, state,
                       idx[rows].long(), scale)
    return o, state


def cuda(*xs):
    return [x.cuda() if x is not None else None for x in xs]


def check(o, state, o_ref, state_ref, state_before, state_indices):
    """o and the state against the reference; rows of the cache no batch row names stay bit-identical."""
    rtol, atol = O_TOL[o.dtype]
    torch.testing.assert_close(o.cpu(), o_ref, rtol=rtol, atol=atol)
    state = state.cpu()
    torch.testing.assert_close(state, state_ref, rtol=STATE_TOL[0], atol=STATE_TOL[1])
    if state_indices is not None:
        idx = state_indices.cpu().long()
        touched = torch.zeros(state.shape[0], dtype=torch.bool)
        touched[idx[idx >= 0]] = True
        assert torch.equal(state[~touched], state_before[~touched]), "a cache row no batch row names was written"
        padded = (idx < 0).nonzero().flatten()
        assert torch.equal(o.cpu()[padded], torch.zeros_like(o_ref[padded])), "a padding row's o is not 0"


@pytest.mark.parametrize("K,V", SHAPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("index", [None, torch.int32, torch.int64])
def test_step_matches_aten(K, V, T, dtype, gated, index):
    B, H = 5, 3
    q, k, v, beta, g = make_inputs(B, T, H, K, V, dtype, gated)
    scale = K**-0.5
    if index is None:
        cache, idx = make_cache(B, H, K, V), None
    else:  # a larger cache, rows in shuffled order, batch row 2 is a padding slot
        cache = make_cache(B + 4, H, K, V)
        idx = torch.randperm(B + 4, generator=torch.Generator().manual_seed(2))[:B].to(index)
        idx[2] = -1
    o_ref, cache_ref = reference(q, k, v, beta, g, cache, idx, scale)
    cache_dev = cache.cuda()
    o = step(*cuda(q, k, v, beta, g), cache_dev, idx.cuda() if idx is not None else None, scale)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    check(o, cache_dev, o_ref, cache_ref, cache, idx)


@pytest.mark.parametrize("T", [8, 11, 20])
def test_tokens_beyond_one_staging_chunk(T):
    """The kernel stages 8 tokens at a time in shared memory: T > 8 runs several chunks."""
    B, H, K, V = 3, 2, 64, 48
    q, k, v, beta, g = make_inputs(B, T, H, K, V, torch.float32, True, seed=3)
    cache = make_cache(B, H, K, V)
    o_ref, cache_ref = reference(q, k, v, beta, g, cache, None, 0.125)
    cache_dev = cache.cuda()
    o = step(*cuda(q, k, v, beta, g), cache_dev, None, 0.125)
    check(o, cache_dev, o_ref, cache_ref, cache, None)


def test_strided_inputs_and_mixed_gate_dtypes():
    """q, k, v as views of one fused projection (non-contiguous), beta fp32 and g fp16 beside bf16 q."""
    B, T, H, K, V = 4, 2, 3, 64, 32
    gen = torch.Generator().manual_seed(4)
    fused = torch.randn(B, T, H, 2 * K + V + 5, generator=gen).to(torch.bfloat16)
    q, k, v = fused[..., :K], fused[..., K:2 * K], fused[..., 2 * K:2 * K + V]
    k = k / k.float().norm(dim=-1, keepdim=True).to(k.dtype)  # a fresh (contiguous) tensor; q and v stay views
    beta = torch.rand(B, H, T, generator=gen).transpose(1, 2)  # fp32, strided [B, T, H]
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen)).half()
    cache = make_cache(B, H, K, V)
    o_ref, cache_ref = reference(q, k, v, beta, g, cache, None, 0.2)
    q_d, v_d = fused.cuda()[..., :K], fused.cuda()[..., 2 * K:2 * K + V]
    assert not q_d.is_contiguous() and not v_d.is_contiguous()
    cache_dev = cache.cuda()
    o = step(q_d, k.cuda(), v_d, beta.cuda(), g.cuda(), cache_dev, None, 0.2)
    check(o, cache_dev, o_ref, cache_ref, cache, None)


def test_unaligned_state_takes_scalar_path():
    """A contiguous state view whose start is not 16-byte aligned (V % 4 == 0 but no vector access)."""
    B, T, H, K, V = 3, 2, 2, 32, 64
    q, k, v, beta, g = make_inputs(B, T, H, K, V, torch.float16, True, seed=5)
    cache = make_cache(B, H, K, V)
    storage = torch.empty(cache.numel() + 1, device="cuda")
    cache_dev = storage[1:].view(B, H, K, V)
    cache_dev.copy_(cache)
    assert cache_dev.data_ptr() % 16 != 0
    o_ref, cache_ref = reference(q, k, v, beta, g, cache, None, 0.3)
    o = step(*cuda(q, k, v, beta, g), cache_dev, None, 0.3)
    check(o, cache_dev, o_ref, cache_ref, cache, None)


def test_all_rows_padding_writes_zeros_only():
    B, T, H, K, V = 4, 2, 2, 16, 16
    q, k, v, beta, g = cuda(*make_inputs(B, T, H, K, V, torch.bfloat16, False))
    cache = make_cache(6, H, K, V).cuda()
    before = cache.clone()
    o = step(q, k, v, beta, g, cache, torch.full((B,), -1, dtype=torch.int64, device="cuda"), 0.25)
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.equal(cache, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_capture_and_replay(dtype):
    """Captured once, replayed with new inputs and new slot indices copied into the static tensors."""
    B, T, H, K, V, N = 6, 1, 4, 128, 128, 10
    scale = K**-0.5
    static = cuda(*make_inputs(B, T, H, K, V, dtype, True, seed=10))
    idx = torch.tensor([3, 0, -1, 7, 5, 9], dtype=torch.int32, device="cuda")
    cache = make_cache(N, H, K, V).cuda()
    expected_cache = cache.cpu()

    side = torch.cuda.Stream()  # warm-up off the capture stream, on a scratch copy of the cache
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*static, cache.clone(), idx, scale)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_static = step(*static, cache, idx, scale)
    torch.cuda.synchronize()
    assert torch.equal(cache.cpu(), expected_cache), "capture must not run the kernel"

    for it in range(3):
        fresh = make_inputs(B, T, H, K, V, dtype, True, seed=20 + it)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        new_idx = idx.cpu()[torch.randperm(B, generator=torch.Generator().manual_seed(it))]
        idx.copy_(new_idx)
        before = expected_cache
        o_ref, expected_cache = reference(*fresh, before, new_idx, scale)
        graph.replay()
        torch.cuda.synchronize()
        check(o_static, cache, o_ref, expected_cache, before, new_idx)
