"""linflow.nn.Deltaformer: shapes, gradients to every parameter, packed sequences, torch.compile."""
import pytest
import torch

from linflow.nn import Deltaformer

CONFIGS = [
    dict(),
    dict(num_kv_heads=1, use_write_proj=True),
    dict(num_kv_heads=2, rope_theta=None, qkv_bias=True, allow_neg_eigval=True),
]


def _layer(hidden=32, heads=4, seed=0, **kw):
    torch.manual_seed(seed)
    return Deltaformer(hidden, heads, chunk_size=16, **kw)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_shapes_and_gradients_reach_every_parameter(cfg):
    m = _layer(**cfg)
    x = torch.randn(2, 23, 32, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cfg", CONFIGS)
def test_varlen_equals_separate_runs(cfg):
    m = _layer(**cfg)
    lens = [7, 1, 40, 0, 12]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.randn(1, sum(lens), 32)
    y = m(x, cu_seqlens=cu)
    for n in range(len(lens)):
        bos, eos = int(cu[n]), int(cu[n + 1])
        if eos > bos:
            torch.testing.assert_close(y[:, bos:eos], m(x[:, bos:eos]), rtol=1e-5, atol=1e-5)


def test_causal():
    m = _layer()
    x = torch.randn(1, 30, 32)
    x2 = x.clone()
    x2[:, 20:] = torch.randn(1, 10, 32)
    torch.testing.assert_close(m(x)[:, :20], m(x2)[:, :20])


def test_bfloat16_layer_runs():
    m = _layer(dtype=torch.bfloat16, use_write_proj=True)
    y = m(torch.randn(2, 17, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_compile_fullgraph():
    torch._dynamo.reset()
    m = _layer(use_write_proj=True, num_kv_heads=2)
    x = torch.randn(2, 19, 32)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Deltaformer(32, 4, num_kv_heads=3)
