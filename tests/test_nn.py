"""linflow.nn.DeltaNet: shapes, gradients, packed sequences, prefill + decode, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import linflow.nn.deltanet as deltanet
from linflow.nn import DeltaNet, DeltaNetState
from linflow.nn.deltanet import short_conv

CONFIGS = [
    dict(use_gate=False),
    dict(use_gate=True),
    dict(use_gate=True, expand_v=2.0, head_dim=8),
    dict(use_gate=False, use_short_conv=False),
    dict(use_gate=True, conv_size=2, allow_neg_eigval=True),
]


def _layer(hidden=32, heads=2, seed=0, **kw):
    torch.manual_seed(seed)
    return DeltaNet(hidden, heads, chunk_size=16, **kw)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_shapes(cfg):
    m = _layer(**cfg)
    x = torch.randn(3, 19, 32)
    y, state = m(x)
    assert y.shape == x.shape and state is None
    y, state = m(x, use_cache=True)
    K, V = m.head_dim, m.head_v_dim
    assert state.recurrent.shape == (3, 2, K, V) and state.recurrent.dtype == torch.float32
    if m.use_short_conv:
        assert state.conv_q.shape == (3, m.conv_size - 1, 2 * K)
        assert state.conv_v.shape == (3, m.conv_size - 1, 2 * V)
    else:
        assert state.conv_q is None


@pytest.mark.parametrize("cfg", CONFIGS)
def test_gradients_reach_every_parameter(cfg):
    m = _layer(**cfg)
    x = torch.randn(2, 23, 32, requires_grad=True)
    y, _ = m(x)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("W", [2, 4])
def test_short_conv_matches_conv1d(W):
    C = 5
    x, w = torch.randn(2, 9, C, dtype=torch.float64), torch.randn(C, W, dtype=torch.float64)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), w[:, None], groups=C).transpose(1, 2)
    y, cache = short_conv(x, w)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(cache, x[:, -(W - 1):])
    # with packed sequences (including one shorter than the cache) nothing crosses a boundary
    lens = [1, 6, 2]
    cu = torch.tensor([0, 1, 7, 9])
    y, cache = short_conv(x[:1], w, cu_seqlens=cu)
    for n in range(len(lens)):
        yn, cn = short_conv(x[:1, cu[n]:cu[n + 1]], w)
        torch.testing.assert_close(y[:, cu[n]:cu[n + 1]], yn)
        torch.testing.assert_close(cache[n:n + 1], cn)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_varlen_equals_separate_runs(cfg, with_state):
    m = _layer(**cfg)
    lens = [7, 1, 40, 2, 12]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.randn(1, sum(lens), 32)
    state = None
    if with_state:  # a state from earlier tokens of each sequence
        _, state = m(torch.randn(len(lens), 5, 32), use_cache=True)
        state = DeltaNetState(*(t.detach() if t is not None else None for t in state))
    y, out = m(x, cu_seqlens=cu, state=state, use_cache=True)
    for n in range(len(lens)):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        row = None if state is None else DeltaNetState(*(t[n:n + 1] if t is not None else None for t in state))
        yn, on = m(x[:, sl], state=row, use_cache=True)
        torch.testing.assert_close(y[:, sl], yn)
        for a, b in zip(out, on):
            if a is not None:
                torch.testing.assert_close(a[n:n + 1], b)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_prefill_then_decode_equals_full_forward(cfg, monkeypatch):
    m = _layer(**cfg)
    x = torch.randn(2, 45, 32)
    steps = []
    real_step = deltanet.delta_rule_step
    monkeypatch.setattr(deltanet, "delta_rule_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    with torch.no_grad():
        full, _ = m(x)
        out, state = m(x[:, :30], use_cache=True)             # prefill: chunked op
        outs = [out]
        for t in range(30, 42):                               # one token at a time: decode step
            y, state = m(x[:, t:t + 1], state=state)
            outs.append(y)
        y, state = m(x[:, 42:], state=state)                  # a few tokens at once: decode step
        outs.append(y)
    assert len(steps) == 13
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_decode_from_empty_state_and_chunked_continuation():
    m = _layer(use_gate=True)
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        full, _ = m(x)
        state = m.init_state(2)
        y0, state = m(x[:, :3], state=state)                  # decode step from zeros
        y1, state = m(x[:, 3:], state=state)                  # long: chunked op from the state
    torch.testing.assert_close(torch.cat([y0, y1], 1), full, rtol=1e-4, atol=1e-5)


def test_state_continuation_under_autograd():
    m = _layer(use_gate=True)
    x = torch.randn(2, 40, 32, requires_grad=True)
    full, _ = m(x)
    y0, state = m(x[:, :25], use_cache=True)
    y1, _ = m(x[:, 25:], state=state)                         # grad enabled: chunked op, differentiable
    torch.testing.assert_close(torch.cat([y0, y1], 1), full, rtol=1e-4, atol=1e-5)
    (y0.sum() + y1.sum()).backward()
    g_split = x.grad.clone()
    x.grad = None
    full.sum().backward()
    torch.testing.assert_close(g_split, x.grad, rtol=1e-4, atol=1e-5)


def _compile_roundtrip(backend):
    m = _layer(use_gate=True)
    cm = torch.compile(m, fullgraph=True, backend=backend)
    x = torch.randn(2, 20, 32, requires_grad=True)
    y, state = cm(x, use_cache=True)
    y_ref, state_ref = m(x, use_cache=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    cu = torch.tensor([0, 6, 20])
    yv, _ = cm(x[:1], cu_seqlens=cu)
    torch.testing.assert_close(yv, m(x[:1], cu_seqlens=cu)[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        s = DeltaNetState(*(t.detach().clone() for t in state_ref))
        s_ref = DeltaNetState(*(t.detach().clone() for t in state_ref))
        tok = torch.randn(2, 1, 32)
        yd, s = cm(tok, state=s)
        yd_ref, s_ref = m(tok, state=s_ref)
    torch.testing.assert_close(yd, yd_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.recurrent, s_ref.recurrent, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph():
    torch._dynamo.reset()
    _compile_roundtrip("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    _compile_roundtrip("inductor")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    m = _layer(use_gate=True)
    x = torch.randn(2, 70, 32)
    y_cpu, s_cpu = m(x, use_cache=True)
    mc = m.cuda()
    y, s = mc(x.cuda(), use_cache=True)
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s.recurrent.cpu(), s_cpu.recurrent, rtol=2e-3, atol=2e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yb, _ = mc(x.cuda())
    yb.float().sum().backward()
    assert torch.isfinite(yb.float()).all()
    with torch.no_grad():
        yt, _ = mc(x[:, :1].cuda(), state=s)
    assert yt.shape == (2, 1, 32)


def test_demo_runs(capsys):
    from linflow import demo
    result = demo.main(["--steps", "3", "--dim", "32", "--pairs", "4", "--batch", "8", "--device", "cpu"])
    assert set(result) >= {"val_acc", "val_loss", "tokens_per_s"}
    assert "held-out accuracy" in capsys.readouterr().out
