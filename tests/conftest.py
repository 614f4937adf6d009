"""Shared test setup: NaN poisoning, devices, random inputs and error metrics.

LINFLOW_POISON must be set before linflow (and its extension) is loaded: the CUDA kernels then fill every output
and workspace with NaN before launch, so an element a kernel forgot to write fails the comparison loudly.
"""
import os

os.environ["LINFLOW_POISON"] = "1"
# OpenMP worker threads that spin-wait stall every parallel region for ~12 ms on small shared VMs (measured on the
# 2-core CI box: a 6x1x64 bmm takes 12 ms with two spinning threads, 3 us with passive waiting). Results do not
# depend on it; it must be set before torch loads the OpenMP runtime. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import linflow  # noqa: E402,F401  (after LINFLOW_POISON)
from reference import l2norm_ref  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# dtype of the state (initial / final) that goes with an input dtype
STATE_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
               torch.float16: torch.float32}


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# metrics

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), computed in float64. NaN anywhere in ``a`` gives NaN (fails every check)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> float:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values ({torch.isnan(actual).sum().item()} NaN)"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > tolerance {tol:.1e}"
    return err


# ----------------------------------------------------------------------------------------------------------------
# inputs

def make_inputs(B, T, H, K, V, *, dtype=torch.float32, device="cpu", gated=True, initial_state=False, N=None,
                seed=0, normalize_keys=True, beta_max=1.0):
    """Fresh random inputs (never zeros), drawn in float64 on the CPU from ``seed`` and then rounded to ``dtype``
    on ``device``, so every dtype / device sees the same values up to rounding.

    q ~ N(0, 1); k ~ N(0, 1), L2-normalised over K unless ``normalize_keys=False``; v ~ N(0, 1);
    beta ~ U(0, beta_max); g = logsigmoid(N(0, 1)) (log decay <= 0); initial_state ~ N(0, 1) / sqrt(K),
    ``[N, H, K, V]`` in the state dtype (N = B unless given).
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    q = torch.randn(B, T, H, K, **f64)
    k = torch.randn(B, T, H, K, **f64)
    if normalize_keys:
        k = l2norm_ref(k)
    v = torch.randn(B, T, H, V, **f64)
    beta = torch.rand(B, T, H, **f64) * beta_max
    g = F.logsigmoid(torch.randn(B, T, H, **f64)) if gated else None
    h0 = torch.randn(B if N is None else N, H, K, V, **f64) * K**-0.5 if initial_state else None
    to = lambda x, dt: None if x is None else x.to(device=device, dtype=dt).contiguous()  # noqa: E731
    return dict(q=to(q, dtype), k=to(k, dtype), v=to(v, dtype), beta=to(beta, dtype), g=to(g, dtype),
                initial_state=to(h0, STATE_DTYPE[dtype]))


def leaves(inputs: dict, dtype=None) -> dict:
    """Detached copies (optionally cast) that require grad; None entries stay None."""
    return {n: None if x is None else x.detach().to(dtype or x.dtype).clone().requires_grad_()
            for n, x in inputs.items()}


def cotangents(o_shape, ht_shape, *, dtype, device, seed=1):
    """Random cotangents for o and the final state (float64 on CPU, then rounded)."""
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(*o_shape, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)
    dht = None
    if ht_shape is not None:
        dht = torch.randn(*ht_shape, dtype=torch.float64, generator=gen).to(device=device, dtype=STATE_DTYPE[dtype])
    return do, dht


def values_and_grads(fn, inputs: dict, do, dht):
    """Run ``fn(**inputs) -> (o, ht)`` and backprop ``<o, do> + <ht, dht>`` into every non-None input.
    Returns ``(o, ht, {name: grad})``."""
    o, ht = fn(**inputs)
    loss = (o * do.to(o.dtype)).sum()
    if dht is not None:
        loss = loss + (ht * dht.to(ht.dtype)).sum()
    names = [n for n, x in inputs.items() if x is not None]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names])
    return o.detach(), (ht.detach() if ht is not None else None), dict(zip(names, grads))


def high_precision_params():
    """(device, dtype) for the tight-tolerance checks: fp64 and fp32 on CPU, fp32 on CUDA."""
    params = [("cpu", torch.float64), ("cpu", torch.float32)]
    if HAS_CUDA:
        params.append(("cuda", torch.float32))
    return [pytest.param(d, t, id=f"{d}-{str(t)[6:]}") for d, t in params]


def low_precision_params(cases, cpu_cases):
    """(case, device, dtype) for bf16 / fp16: a few cases on CPU (slow there), every case on CUDA."""
    params = []
    for dtype in (torch.bfloat16, torch.float16):
        params += [pytest.param(c, "cpu", dtype, id=f"{c}-cpu-{str(dtype)[6:]}") for c in cpu_cases]
        if HAS_CUDA:
            params += [pytest.param(c, "cuda", dtype, id=f"{c}-cuda-{str(dtype)[6:]}") for c in cases]
    return params


# Tolerances (relative Frobenius error vs the fp64 oracle; see test_delta_rule.py's docstring for the rationale).
TOL = {("cpu", torch.float64): 1e-10, ("cpu", torch.float32): 2e-5, ("cuda", torch.float32): 5e-3}
ROUNDOFF_FLOOR = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
CAP = {torch.bfloat16: (2e-2, 4e-2), torch.float16: (2.5e-3, 5e-3)}  # (values, gradients)


def low_precision_tol(baseline_err: float, dtype, gradient: bool) -> float:
    """bf16 / fp16: at most 2x the error of the same math done in PyTorch at that precision, with a floor of two
    units of roundoff (four for a gradient, a difference of several rounded chunk terms: seen on the H100, dg at
    T=1 in bf16 was 1.03e-2 against a PyTorch baseline of 4.4e-3) and a cap."""
    floor = ROUNDOFF_FLOOR[dtype] * (2 if gradient else 1)
    return min(max(2 * baseline_err, floor), CAP[dtype][gradient])
