"""linflow's row L2 norm (the q/k normalisation of use_qk_l2norm), torch.ops.linflow.l2norm_fwd / l2norm_bwd:
values and gradients against float64 PyTorch math, every dtype, odd row lengths, on CPU (ATen form) and CUDA (the
fused kernel for rows of <= 256, the ATen form beyond); opcheck; fp64 gradcheck; bad input refused by name."""
import pytest
import torch

from conftest import HAS_CUDA, assert_rel_close
from linflow.ops.delta_rule import l2norm

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def reference(x, dy, eps=1e-6):
    x64 = x.detach().double().requires_grad_()
    y = x64 / torch.sqrt(x64.pow(2).sum(-1, keepdim=True) + eps)
    (dx,) = torch.autograd.grad(y, x64, dy.double())
    return y, dx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("d", [2, 16, 33, 128, 256, 300])
def test_values_and_grads(device, dtype, d):
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(3, 37, 2, d, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(3, 37, 2, d, generator=gen).to(device=device, dtype=dtype)
    y = l2norm(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    ry, rdx = reference(x, dy)
    assert y.dtype == dx.dtype == dtype
    assert_rel_close(y, ry, DTYPES[dtype], "y")
    assert_rel_close(dx, rdx, 4 * DTYPES[dtype], "dx")


@pytest.mark.parametrize("device", DEVICES)
def test_rstd_and_non_contiguous_input(device):
    x = torch.randn(64, 8, 5, device=device).transpose(0, 2)  # rows of 64 elements, strided
    y, rstd = torch.ops.linflow.l2norm_fwd(x.contiguous(), 1e-6)
    assert rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32
    assert_rel_close(y, l2norm(x), 1e-6, "y")
    assert_rel_close(rstd, x.double().pow(2).sum(-1).add(1e-6).rsqrt(), 1e-6, "rstd")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    x = torch.randn(0, 4, 128, device=device, requires_grad=True)
    y = l2norm(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


def test_gradcheck_fp64():
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2norm, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(4, 3, 64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.linflow.l2norm_fwd.default, (x, 1e-6))
    y, r = torch.ops.linflow.l2norm_fwd(x.detach(), 1e-6)
    torch.library.opcheck(torch.ops.linflow.l2norm_bwd.default, (torch.randn_like(x), x.detach(), r))


def test_bad_input_is_refused_by_name():
    with pytest.raises(RuntimeError, match=r"l2norm_fwd: x must be float32"):
        torch.ops.linflow.l2norm_fwd(torch.ones(3, 4, dtype=torch.int32), 1e-6)
    with pytest.raises(RuntimeError, match=r"l2norm_bwd: rstd has shape"):
        torch.ops.linflow.l2norm_bwd(torch.ones(3, 4), torch.ones(3, 4), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"l2norm_bwd: grad_y has shape"):
        torch.ops.linflow.l2norm_bwd(torch.ones(3, 5), torch.ones(3, 4), torch.ones(3))
