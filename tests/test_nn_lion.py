"""linflow.nn.LION: shapes, gradients, padding masks (a padded batch equals the sequences run alone), feature maps,
torch.compile(fullgraph=True)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close
from linflow.nn import LION
from linflow.nn.lion import feature_map

CONFIGS = [
    dict(decay="none"),
    dict(decay="fixed"),
    dict(decay="selective"),
    dict(decay="selective", decay_convention="lion_code"),
    dict(decay="fixed", feature_map="identity", normalize=False),  # the authors' masked-LM layer
]
IDS = ["lit", "d", "s", "s-lion_code", "d-mlm"]


def _layer(cfg, hidden=32, heads=2, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return LION(hidden, heads, chunk_size=16, dtype=dtype, **cfg, **kw)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_shapes_and_gradients_reach_every_parameter(cfg):
    m = _layer(cfg, dtype=torch.float32)
    x = torch.randn(3, 37, 32, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_feature_maps():
    x = torch.randn(4, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(feature_map(x, "elu"), F.elu(x) + 1)
    y = feature_map(x, "silu_norm")
    assert (y > 0).all()
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(4, 7, dtype=torch.float64))
    torch.testing.assert_close(y, (F.silu(x) + 0.5) / (F.silu(x) + 0.5).norm(dim=-1, keepdim=True))
    assert LION(8, 2, decay="none").feature_map == "elu" and LION(8, 2, decay="fixed").feature_map == "silu_norm"
    m = LION(8, 2, decay="fixed")
    assert ((m.lam() > 0) & (m.lam() < 1)).all()
    with pytest.raises(ValueError, match="feature_map"):
        LION(8, 2, feature_map="relu")
    with pytest.raises(ValueError, match="normalize=True needs a non-negative feature map"):
        LION(8, 2, feature_map="identity")


@pytest.mark.parametrize("padding", ["right", "left", "holes"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_padded_batch_equals_sequences_run_alone(cfg, padding):
    m = _layer(cfg)
    lengths = [37, 5, 20, 1]
    T = max(lengths) + 3
    x = torch.randn(len(lengths), T, 32, dtype=torch.float64)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, :n] = True
        elif padding == "left":
            mask[b, T - n:] = True
        else:  # real tokens at random positions
            mask[b, torch.randperm(T, generator=gen)[:n]] = True
    x = x.requires_grad_()
    y = m(x, attention_mask=mask.to(torch.int64) if padding == "left" else mask)
    assert (y[~mask] == m.o_proj.bias).all()  # padded outputs: o = 0
    dy = torch.randn_like(y) * mask[..., None]
    (y * dy).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    summed = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for b in range(len(lengths)):
        xb = x.detach()[b:b + 1, mask[b]].clone().requires_grad_()
        m.zero_grad()
        yb = m(xb)
        assert_rel_close(y[b:b + 1, mask[b]], yb, 1e-10, f"sequence {b}")
        (yb * dy[b:b + 1, mask[b]]).sum().backward()
        assert_rel_close(x.grad[b:b + 1, mask[b]], xb.grad, 1e-10, f"dx, sequence {b}")
        assert (x.grad[b, ~mask[b]] == 0).all()
        for n, p in m.named_parameters():
            summed[n] += p.grad
    for n in grads:
        assert_rel_close(grads[n], summed[n], 1e-10, f"d{n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_layer_is_finite_and_close(dtype):
    m = _layer(dict(decay="selective"), dtype=torch.float32)
    x = torch.randn(2, 50, 32)
    ref = m(x)
    y = m.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    assert_rel_close(y, ref, 3e-2, "y")


def test_recurrent_mode_for_inference():
    m = _layer(dict(decay="selective"), mode="recurrent")
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        m.mode = "full"
        assert_rel_close(y, m(x), 1e-12, "recurrent vs full")


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[2]], ids=["d", "s"])
def test_compile_fullgraph_with_padding_mask(cfg):
    torch._dynamo.reset()
    m = _layer(cfg, dtype=torch.float32)
    x = torch.randn(2, 40, 32)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    compiled = torch.compile(m, fullgraph=True)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, ey = compiled(xs[0], attention_mask=mask), m(xs[1], attention_mask=mask)
    assert_rel_close(y, ey, 1e-5, "y")
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ey.square().sum().backward()
    assert_rel_close(xs[0].grad, xs[1].grad, 1e-5, "dx")
    for n, p in m.named_parameters():
        assert_rel_close(grads[n], p.grad, 1e-5, f"d{n}")
