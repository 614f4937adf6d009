"""linflow.deltaformer against the float64 token-by-token recurrence in reference.py (deltaformer_ref).

Tolerances (relative Frobenius error vs the fp64 oracle run on the *same rounded inputs*):
  * float64 (CPU): 1e-10.  float32: 2e-5 on CPU (measured <= 5.3e-7 over CASES), 5e-3 on CUDA (room for TF32
    GEMMs).
  * bfloat16 / float16 (STYLE.md): <= 2x the error of the same math done in PyTorch at that precision (the
    reference loop with every op in the low-precision dtype, forward and autograd backward), with a floor of two
    units of roundoff (four for gradients) and a cap (bf16 2e-2 values / 4e-2 gradients, fp16 1/8 of that).
"""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import linflow
from conftest import (CAP, HAS_CUDA, TOL, assert_rel_close, high_precision_params, low_precision_params,
                      low_precision_tol, rel_err)
from reference import deltaformer_ref

FWD, BWD = torch.ops.linflow.deltaformer_fwd, torch.ops.linflow.deltaformer_bwd

class Case(NamedTuple):
    T: int
    K: int
    V: int
    beta: str = "rand"  # "none" (beta = 1), "rand" (U(0, 1)), "big" (U(0, 2))
    w: bool = False  # a separate write query
    H: int = 2
    Hkv: int = 2
    chunk: int = 64
    B: int = 2
    scale: float | None = None

    def __str__(self):
        flags = [f"T{self.T}", f"K{self.K}", f"V{self.V}", f"beta-{self.beta}", "w" if self.w else "w=k",
                 f"H{self.H}", f"Hkv{self.Hkv}", f"C{self.chunk}"]
        return "-".join(flags + ([f"s{self.scale}"] if self.scale else []))


# A covering set, not the cartesian product: every T in {1, 2, 63, 64, 65, 257}, K and V in {32, 64, 128}, beta
# none / (0, 1) / (0, 2), w = k and a separate w, GQA (H = 2 Hkv, H = 4 Hkv, MQA), chunk sizes 16 / 32 / 64.
CASES = [
    Case(T=1, K=32, V=32, beta="none"),
    Case(T=1, K=64, V=32, beta="rand", w=True, H=4, Hkv=1, chunk=16),
    Case(T=2, K=32, V=64, beta="big", w=True),
    Case(T=63, K=64, V=64, beta="rand", chunk=16),
    Case(T=63, K=128, V=32, beta="none", H=4, Hkv=2),
    Case(T=64, K=32, V=128, beta="big", w=True, chunk=32),
    Case(T=64, K=64, V=64, beta="rand", H=2, Hkv=1, scale=0.3),
    Case(T=65, K=128, V=128, beta="rand", w=True, B=1),
    Case(T=65, K=32, V=32, beta="big", H=4, Hkv=2, chunk=16),
    Case(T=257, K=64, V=32, beta="rand", w=True, H=4, Hkv=2, B=1),
    Case(T=257, K=32, V=64, beta="big", chunk=16, B=1),
    Case(T=257, K=32, V=32, beta="none", chunk=32, B=1, H=1, Hkv=1),
]
# the subset the CPU also runs in bf16 / fp16 (the CUDA device runs all of them)
CPU_LOW_PRECISION_CASES = [CASES[5], CASES[8]]


def make_deltaformer_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0, beta_dtype=None):
    """q, k, w ~ N(0, 1), v ~ N(0, 1), beta ~ U(0, beta_max); drawn in float64 on the CPU from ``seed``, then
    rounded to ``dtype`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    B, T, H, Hkv, K, V = case.B, case.T, case.H, case.Hkv, case.K, case.V
    x = dict(q=torch.randn(B, T, H, K, **f64), k=torch.randn(B, T, Hkv, K, **f64),
             v=torch.randn(B, T, Hkv, V, **f64),
             beta=None if case.beta == "none" else torch.rand(B, T, Hkv, **f64) * (2.0 if case.beta == "big" else 1.0),
             w=torch.randn(B, T, Hkv, K, **f64) if case.w else None)
    out = {n: None if t is None else t.to(device=device, dtype=dtype) for n, t in x.items()}
    if beta_dtype is not None and out["beta"] is not None:
        out["beta"] = out["beta"].to(beta_dtype)
    return out


def cotangents(case: Case, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(case.B, case.T, case.H, case.V, dtype=torch.float64, generator=gen)
    du = torch.randn(case.B, case.T, case.Hkv, case.V, dtype=torch.float64, generator=gen)
    return do.to(device=device, dtype=dtype), du.to(device=device, dtype=dtype)


def leaves(inputs: dict, dtype=None) -> dict:
    return {n: None if x is None else x.detach().to(dtype or x.dtype).clone().requires_grad_()
            for n, x in inputs.items()}


def values_and_grads(fn, inputs: dict, do, du):
    """``fn(**inputs) -> (o, u)``; backprop ``<o, do> + <u, du>`` into every non-None input."""
    o, u = fn(**inputs)
    loss = (o * do.to(o.dtype)).sum()
    if du is not None:
        loss = loss + (u * du.to(u.dtype)).sum()
    names = [n for n, x in inputs.items() if x is not None]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    grads = [torch.zeros_like(inputs[n]) if g is None else g for n, g in zip(names, grads)]  # unused: zero
    return o.detach(), u.detach(), dict(zip(names, grads))


def run_op(case: Case, **kw):
    def fn(q, k, v, beta, w):
        return linflow.deltaformer(q, k, v, beta, w, scale=case.scale, chunk_size=case.chunk, return_u=True, **kw)
    return fn


def run_ref(case: Case, dtype=torch.float64, **kw):
    def fn(q, k, v, beta, w):
        return deltaformer_ref(q, k, v, beta, w, scale=case.scale, dtype=dtype, **kw)
    return fn




# ----------------------------------------------------------------------------------------------------------------
# values and gradients vs the oracle

@pytest.mark.parametrize("device,dtype", high_precision_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_values_and_grads_match_reference(case, device, dtype):
    inputs = make_deltaformer_inputs(case, dtype, device)
    do, du = cotangents(case, dtype, device)
    o, u, grads = values_and_grads(run_op(case), leaves(inputs), do, du)
    ro, ru, rgrads = values_and_grads(run_ref(case), leaves(inputs, torch.float64), do.double(), du.double())
    tol = TOL[(device, dtype)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert o.dtype == dtype and o.shape == (case.B, case.T, case.H, case.V)
    assert u.dtype == acc and u.shape == (case.B, case.T, case.Hkv, case.V)
    assert_rel_close(o, ro, tol, "o")
    assert_rel_close(u, ru, tol, "u")
    assert set(grads) == {n for n, x in inputs.items() if x is not None}
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        if rgrads[name].abs().max() == 0:  # T = 1: o and u do not depend on q, k, beta, w
            assert grad.abs().max() <= tol, f"d{name} must be 0 up to roundoff"  # dO.u - dO.o: 1e-16 in fp64
        else:
            assert_rel_close(grad, rgrads[name], tol, f"d{name}")


@pytest.mark.parametrize("case,device,dtype", low_precision_params(CASES, CPU_LOW_PRECISION_CASES))
def test_low_precision_within_2x_pytorch_error(case, device, dtype):
    assert_within_2x_pytorch_error(case, device, dtype)


def assert_within_2x_pytorch_error(case, device, dtype, cu_seqlens=None):
    """Values and gradients (of <o, do>) vs the fp64 oracle, within 2x the error of the PyTorch reference loop
    run in ``dtype`` (``low_precision_tol``)."""
    inputs = make_deltaformer_inputs(case, dtype, device)
    do, du = cotangents(case, dtype, device)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    ref_kw = {} if cu is None else dict(cu_seqlens=cu.cpu())
    op_kw = {} if cu is None else dict(cu_seqlens=cu)
    o, u, grads = values_and_grads(run_op(case, **op_kw), leaves(inputs), do, None)
    ro, ru, rgrads = values_and_grads(run_ref(case, **ref_kw), leaves(inputs, torch.float64), do.double(), None)
    bo, bu, bgrads = values_and_grads(run_ref(case, dtype=dtype, **ref_kw), leaves(inputs), do, None)

    def check(name, ours, base, ref, gradient=False):
        tol = low_precision_tol(rel_err(base, ref), dtype, gradient)
        if ref.abs().max() == 0:  # T <= 2: some gradients vanish exactly (a softmax over one key); ours: roundoff
            assert ours.abs().max() <= tol, f"{name} must be 0 up to roundoff"
            return
        assert_rel_close(ours, ref, tol, f"{name} (PyTorch {str(dtype)[6:]} error {rel_err(base, ref):.2e})")

    assert o.dtype == dtype
    check("o", o, bo, ro)
    check("u", u, bu, ru)
    for name in rgrads:
        check(f"d{name}", grads[name], bgrads[name], rgrads[name], gradient=True)


# The CUDA read-pass kernels (bf16 / fp16, K and V multiples of 8 up to 128; query and key tiles of 64 rows):
# partial tiles, T = 1, several tiles, GQA and MQA, V != K, head dims padded inside the kernel (48, 24), an explicit
# scale, and packed sequences with an empty one.
READ_KERNEL_CASES = [
    Case(T=1, K=64, V=64, beta="rand"),
    Case(T=130, K=32, V=128, beta="rand", H=4, Hkv=1, B=1),
    Case(T=200, K=128, V=64, beta="none", w=True, H=4, Hkv=2, B=1),
    Case(T=129, K=128, V=128, beta="rand", B=2, scale=0.2),
    Case(T=100, K=48, V=24, beta="rand", H=2, Hkv=1, B=1),
    Case(T=64, K=64, V=32, beta="big", H=4, Hkv=2, B=3),
]
READ_KERNEL_LENGTHS = [1, 63, 0, 65, 130, 2]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case", READ_KERNEL_CASES, ids=str)
def test_cuda_read_kernels_within_2x_pytorch_error(case, dtype):
    assert_within_2x_pytorch_error(case, "cuda", dtype)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("K,V", [(32, 32), (64, 128), (128, 64)], ids=["K32-V32", "K64-V128", "K128-V64"])
def test_cuda_read_kernels_varlen_with_empty_sequence(K, V, dtype):
    offsets = [0]
    for n in READ_KERNEL_LENGTHS:
        offsets.append(offsets[-1] + n)
    case = Case(T=offsets[-1], K=K, V=V, beta="rand", w=True, H=4, Hkv=2, B=1)
    assert_within_2x_pytorch_error(case, "cuda", dtype, cu_seqlens=offsets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_fp32_beta_with_low_precision_inputs(device, dtype):
    """beta may come in float32 while q, k, v, w are bf16 / fp16; its gradient comes back in float32."""
    case = Case(T=70, K=32, V=32, beta="rand", w=True, H=4, Hkv=2, chunk=32)
    inputs = make_deltaformer_inputs(case, dtype, device, beta_dtype=torch.float32)
    do, _ = cotangents(case, dtype, device)
    o, u, grads = values_and_grads(run_op(case), leaves(inputs), do, None)
    ro, ru, rgrads = values_and_grads(run_ref(case), leaves(inputs, torch.float64), do.double(), None)
    assert o.dtype == dtype and grads["beta"].dtype == torch.float32
    value_tol, grad_tol = CAP[dtype]
    assert_rel_close(o, ro, value_tol, "o")
    for name in rgrads:
        assert_rel_close(grads[name], rgrads[name], grad_tol, f"d{name}")


# ----------------------------------------------------------------------------------------------------------------
# properties

def test_chunk_size_does_not_change_result():
    case = Case(T=100, K=16, V=24, beta="big", w=True, H=4, Hkv=2)
    inputs = make_deltaformer_inputs(case, torch.float64)
    do, du = cotangents(case, torch.float64, "cpu")
    results = [values_and_grads(run_op(case._replace(chunk=c)), leaves(inputs), do, du) for c in (16, 32, 64)]
    for o, u, grads in results[1:]:
        assert_rel_close(o, results[0][0], 1e-12, "o")
        assert_rel_close(u, results[0][1], 1e-12, "u")
        for name in grads:
            assert_rel_close(grads[name], results[0][2][name], 1e-12, f"d{name}")


def test_beta_zero_is_causal_softmax_attention(device):
    """beta = 0: u = v, so o is plain causal softmax attention (checked against torch's SDPA)."""
    case = Case(T=70, K=16, V=8, H=4, Hkv=2)
    x = make_deltaformer_inputs(case, torch.float32, device)
    o, u = linflow.deltaformer(x["q"], x["k"], x["v"], torch.zeros_like(x["v"][..., 0]), return_u=True, chunk_size=16)
    torch.testing.assert_close(u, x["v"])
    k, v = (t.repeat_interleave(2, dim=2).transpose(1, 2) for t in (x["k"], x["v"]))
    ref = F.scaled_dot_product_attention(x["q"].transpose(1, 2), k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_w_equal_k_is_the_default():
    case = Case(T=40, K=8, V=8, beta="rand")
    x = make_deltaformer_inputs(case, torch.float64)
    o1 = linflow.deltaformer(x["q"], x["k"], x["v"], x["beta"], chunk_size=16)
    o2 = linflow.deltaformer(x["q"], x["k"], x["v"], x["beta"], x["k"], chunk_size=16)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)


def test_large_logits_stay_finite(device):
    """Scores of +-1e4: every softmax subtracts its running max, so nothing overflows."""
    case = Case(T=130, K=16, V=8, beta="big", w=True)
    x = leaves(make_deltaformer_inputs(case, torch.float32, device))
    for n in ("q", "k", "w"):
        x[n] = (x[n].detach() * 100).requires_grad_()
    o, u = run_op(case._replace(chunk=32))(**x)
    (o.sum() + u.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(u).all()
    for n, t in x.items():
        assert torch.isfinite(t.grad).all(), n


def test_empty_sequence(device):
    case = Case(T=0, K=8, V=4, beta="rand", w=True)
    x = leaves(make_deltaformer_inputs(case, torch.float32, device))
    o, u = run_op(case)(**x)
    assert o.shape == (2, 0, 2, 4) and u.shape == (2, 0, 2, 4)
    o.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in x.values() if t is not None)


def test_non_contiguous_inputs_give_same_result():
    case = Case(T=50, K=16, V=8, beta="rand", w=True)
    x = make_deltaformer_inputs(case, torch.float32)
    views = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in x.items()}
    assert not any(t.is_contiguous() for t in views.values())
    do, du = cotangents(case, torch.float32, "cpu")
    o, u, grads = values_and_grads(run_op(case), leaves(views), do, du)
    eo, eu, egrads = values_and_grads(run_op(case), leaves(x), do, du)
    torch.testing.assert_close(o, eo)
    torch.testing.assert_close(u, eu)
    for n in egrads:
        torch.testing.assert_close(grads[n], egrads[n])


# ----------------------------------------------------------------------------------------------------------------
# variable length

SAME_MATH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def varlen_params():
    params = [("cpu", torch.float64), ("cpu", torch.float32)]
    if HAS_CUDA:
        params += [("cuda", torch.float32), ("cuda", torch.bfloat16)]
    return [pytest.param(d, t, id=f"{d}-{str(t)[6:]}") for d, t in params]


@pytest.mark.parametrize("device,dtype", varlen_params())
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_varlen_equals_separate_runs(device, dtype, index_dtype):
    lengths = [1, 63, 0, 65, 2, 40]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    case = Case(T=offsets[-1], K=32, V=16, beta="big", w=True, H=4, Hkv=2, B=1, chunk=32)
    inputs = make_deltaformer_inputs(case, dtype, device)
    do, du = cotangents(case, dtype, device)
    cu = torch.tensor(offsets, dtype=index_dtype, device=device)
    o, u, grads = values_and_grads(run_op(case, cu_seqlens=cu), leaves(inputs), do, du)
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        if eos == bos:
            continue
        seq = {name: None if x is None else x[:, bos:eos] for name, x in inputs.items()}
        so, su, sgrads = values_and_grads(run_op(case), leaves(seq), do[:, bos:eos], du[:, bos:eos])
        where = f"sequence {n} (length {eos - bos})"
        tol = SAME_MATH_TOL[dtype]
        assert_rel_close(o[:, bos:eos], so, tol, f"o, {where}")
        assert_rel_close(u[:, bos:eos], su, tol, f"u, {where}")
        for name, grad in sgrads.items():
            if grad.abs().max() > 0:
                assert_rel_close(grads[name][:, bos:eos], grad, tol, f"d{name}, {where}")
    if dtype in (torch.float64, torch.float32):  # and the packed run against the oracle
        ro, ru, rgrads = values_and_grads(run_ref(case, cu_seqlens=cu.cpu()), leaves(inputs, torch.float64),
                                          do.double(), du.double())
        tol = TOL[(device, dtype)]
        assert_rel_close(o, ro, tol, "o")
        assert_rel_close(u, ru, tol, "u")
        for name in rgrads:
            assert_rel_close(grads[name], rgrads[name], tol, f"d{name}")


# ----------------------------------------------------------------------------------------------------------------
# autograd, torch.library, torch.compile

@pytest.mark.parametrize("variant", ["beta-w-gqa", "plain", "varlen"])
def test_gradcheck_fp64(variant):
    # T = 19 with chunk 16 (two chunks, the second partial) and key blocks of 64 rows
    case = Case(T=19, K=4, V=3, beta="big" if variant != "plain" else "none", w=variant != "plain",
                H=2 if variant == "plain" else 4, Hkv=2 if variant == "plain" else 1, B=1, chunk=16)
    x = make_deltaformer_inputs(case, torch.float64)
    names = [n for n, t in x.items() if t is not None]
    cu = torch.tensor([0, 5, 5, 19]) if variant == "varlen" else None

    def fn(*args):
        kw = dict(zip(names, args))
        return linflow.deltaformer(**kw, chunk_size=16, cu_seqlens=cu, return_u=True)

    assert torch.autograd.gradcheck(fn, [x[n].clone().requires_grad_() for n in names])


def test_gradcheck_fp64_long_rows():
    """Rows that see several key blocks (chunk 16: blocks of 64 keys) in the write and read passes."""
    case = Case(T=150, K=3, V=2, beta="rand", w=True, H=1, Hkv=1, B=1, chunk=16)
    x = make_deltaformer_inputs(case, torch.float64)

    def fn(q, k, v, beta, w):
        return linflow.deltaformer(q, k, v, beta, w, chunk_size=16)

    assert torch.autograd.gradcheck(fn, [x[n].clone().requires_grad_() for n in ("q", "k", "v", "beta", "w")],
                                    fast_mode=True)


def opcheck_args(dtype, variant, backward=False):
    varlen = variant == "varlen"
    case = Case(T=40, K=16, V=8, beta="rand" if variant != "plain" else "none", w=variant != "plain",
                H=4, Hkv=2, B=1 if varlen else 2)
    x = make_deltaformer_inputs(case, dtype)
    cu = torch.tensor([0, 10, 10, 40], dtype=torch.int32) if varlen else None
    args = (x["q"], x["k"], x["v"], x["beta"], x["w"], cu, 0.25, 16)
    if not backward:
        return tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
    o, u, r, lse_w, lse_o = FWD(*args)
    do, du = cotangents(case, dtype, "cpu")
    return (*args[:6], o, u, r, lse_w, lse_o, do, du if variant != "plain" else None, 0.25, 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("variant", ["beta-w", "plain", "varlen"])
def test_opcheck_deltaformer_fwd(dtype, variant):
    torch.library.opcheck(FWD, opcheck_args(dtype, variant))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("variant", ["beta-w", "plain", "varlen"])
def test_opcheck_deltaformer_bwd(dtype, variant):
    torch.library.opcheck(BWD, opcheck_args(dtype, variant, backward=True))


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    case = Case(T=30, K=8, V=8, beta="rand", w=True, H=4, Hkv=2)
    x = make_deltaformer_inputs(case, torch.float32)
    do, du = cotangents(case, torch.float32, "cpu")

    def layer(q, k, v, beta, w):
        o, u = linflow.deltaformer(q, k, v, beta.sigmoid(), w, chunk_size=16, return_u=True)
        return o * 2, u

    compiled = torch.compile(layer, fullgraph=True)
    o, u, grads = values_and_grads(compiled, leaves(x), do, du)
    eo, eu, egrads = values_and_grads(layer, leaves(x), do, du)
    assert_rel_close(o, eo, 1e-5, "o")
    assert_rel_close(u, eu, 1e-5, "u")
    for name in egrads:
        assert_rel_close(grads[name], egrads[name], 1e-5, f"d{name}")


def test_gradient_through_u_only():
    """With return_u and a loss on u alone, o's cotangent is absent (not materialised) and the gradients still match."""
    case = Case(T=45, K=8, V=8, beta="big", w=True, H=2, Hkv=1, chunk=16)
    x = make_deltaformer_inputs(case, torch.float64)
    _, du = cotangents(case, torch.float64, "cpu")
    ours, ref = leaves(x), leaves(x)
    _, u = run_op(case)(**ours)
    _, ru = run_ref(case)(**ref)
    names = [n for n, t in x.items() if t is not None]
    g = torch.autograd.grad((u * du).sum(), [ours[n] for n in names], allow_unused=True)
    rg = torch.autograd.grad((ru * du).sum(), [ref[n] for n in names], allow_unused=True)
    for n, a, b in zip(names, g, rg):
        if b is None:  # q only reads
            assert a is None or a.abs().max() == 0, n
        else:
            assert_rel_close(a, b, 1e-10, f"d{n}")
