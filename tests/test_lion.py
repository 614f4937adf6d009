"""linflow.lion (bidirectional linear attention, ALGORITHMS.md §4) against the float64 T x T masked matrix in
reference.py (lion_ref: every mask entry built from its defining product of decays).

Tolerances (relative Frobenius error vs the fp64 oracle run on the same rounded inputs): float64 1e-10;
float32 1e-5 (5e-5 for dlam, a sum over all T x T pairs: 1.4e-5 seen at T = 65); bfloat16 / float16 per STYLE.md: <= 2x the error of the same math (the reference)
done by PyTorch at that precision, floor of two units of roundoff (four for gradients).
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F

import linflow
from conftest import assert_rel_close, rel_err
from reference import lion_ref

FWD, BWD = torch.ops.linflow.lion_fwd, torch.ops.linflow.lion_bwd
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ROUNDOFF = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

# decay variants: (decay, uses g_backward)
DECAYS = ["none", "fixed", "selective", "selective+g_backward"]


def make_lion_inputs(B, T, H, K, V, *, decay, normalize, dtype=torch.float64, seed=0):
    """q, k = elu(x) + 1 (non-negative, the LION-lit feature map) when normalising, N(0, 1) otherwise; v ~ N(0, 1);
    g, g_backward = logsigmoid(N(0, 1) + 1); lam ~ U(0.5, 0.99). Drawn in float64, then rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    q, k = torch.randn(B, T, H, K, **f64), torch.randn(B, T, H, K, **f64)
    if normalize:
        q, k = F.elu(q) + 1, F.elu(k) + 1
    x = dict(q=q, k=k, v=torch.randn(B, T, H, V, **f64))
    if decay.startswith("selective"):
        x["g"] = F.logsigmoid(torch.randn(B, T, H, **f64) + 1)
    if decay.endswith("g_backward"):
        x["g_backward"] = F.logsigmoid(torch.randn(B, T, H, **f64) + 1)
    if decay == "fixed":
        x["lam"] = 0.5 + 0.49 * torch.rand(H, **f64)
    return {n: t.to(dtype) for n, t in x.items()}


def options(decay, **kw):
    return dict(decay=decay.split("+")[0], **kw)


def grads_of(fn, inputs, do):
    """(o, {name: grad}) of <fn(**inputs), do> for every input."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    o = fn(**leaves)
    names = list(leaves)
    grads = torch.autograd.grad((o * do.to(o.dtype)).sum(), [leaves[n] for n in names])
    return o.detach(), dict(zip(names, grads))


def assert_grad_close(actual, expected, tol, name):
    """Relative error with a floor: a gradient that is ~0 in exact arithmetic (dq at T = 1 with normalisation: o = v
    up to eps) is compared against 1e-2 per element (the other gradients' scale) instead of its own rounding noise."""
    floor = 1e-2 * expected.numel() ** 0.5
    if expected.double().norm() >= floor:
        return assert_rel_close(actual, expected, tol, name)
    assert torch.isfinite(actual).all(), name
    err = (actual.double() - expected.double()).norm().item() / floor
    assert err <= tol, f"{name}: error {err:.3e} (relative to the floor) > tolerance {tol:.1e}"


def cotangent(B, T, H, V, dtype, seed=1):
    return torch.randn(B, T, H, V, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# values and gradients vs the oracle

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("T", [1, 63, 65, 130])
@pytest.mark.parametrize("convention", ["symmetric", "lion_code"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("decay", DECAYS)
def test_values_and_grads_match_reference(decay, normalize, convention, T, dtype):
    B, H, K, V = 2, 2, 16, 8  # K != V
    inputs = make_lion_inputs(B, T, H, K, V, decay=decay, normalize=normalize, dtype=dtype)
    do = cotangent(B, T, H, V, dtype)
    opts = options(decay, normalize=normalize, decay_convention=convention)
    ro, rgrads = grads_of(lambda **x: lion_ref(**x, **opts), {n: t.double() for n, t in inputs.items()}, do.double())
    tol = TOL[dtype]
    for mode in ("chunked", "full"):
        o, grads = grads_of(lambda **x: linflow.lion(**x, **opts, mode=mode, chunk_size=16), inputs, do)
        assert o.dtype == dtype and o.shape == (B, T, H, V)
        assert_rel_close(o, ro, tol, f"o ({mode})")
        assert set(grads) == set(rgrads)
        for name, grad in grads.items():
            assert grad.dtype == dtype, name
            # dlam sums weighted terms over all T x T pairs (cancelling signs): 5x the fp32 tolerance
            gtol = 5 * tol if name == "lam" and dtype == torch.float32 else tol
            assert_grad_close(grad, rgrads[name], gtol, f"d{name} ({mode})")
    with torch.no_grad():
        o = linflow.lion(**inputs, **opts, mode="recurrent")
    assert_rel_close(o, ro, tol, "o (recurrent)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("decay", ["none", "fixed", "selective+g_backward"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
def test_low_precision_within_2x_pytorch_error(decay, normalize, dtype):
    B, T, H, K, V = 2, 100, 2, 32, 16
    inputs = make_lion_inputs(B, T, H, K, V, decay=decay, normalize=normalize, dtype=dtype)
    do = cotangent(B, T, H, V, dtype)
    opts = options(decay, normalize=normalize, decay_convention="lion_code")
    ro, rgrads = grads_of(lambda **x: lion_ref(**x, **opts), {n: t.double() for n, t in inputs.items()}, do.double())
    bo, bgrads = grads_of(lambda **x: lion_ref(**x, **opts, dtype=dtype), inputs, do)  # PyTorch at this precision
    o, grads = grads_of(lambda **x: linflow.lion(**x, **opts, mode="chunked", chunk_size=32), inputs, do)

    def check(name, ours, base, ref, gradient):
        tol = max(2 * rel_err(base, ref), ROUNDOFF[dtype] * (4 if gradient else 2))
        assert_rel_close(ours, ref, tol, f"{name} (PyTorch {str(dtype)[6:]} error {rel_err(base, ref):.2e})")

    assert o.dtype == dtype
    check("o", o, bo, ro, False)
    for name in rgrads:
        assert grads[name].dtype == dtype
        check(f"d{name}", grads[name], bgrads[name], rgrads[name], True)


def test_fp32_gates_with_bf16_inputs():
    """g / lam may come in fp32 with bf16 q, k, v (the usual mixed-precision layer); their gradients stay fp32."""
    B, T, H, K, V = 1, 70, 2, 16, 16
    x = make_lion_inputs(B, T, H, K, V, decay="selective", normalize=True, dtype=torch.bfloat16)
    x["g"] = make_lion_inputs(B, T, H, K, V, decay="selective", normalize=True)["g"].float()
    do = cotangent(B, T, H, V, torch.bfloat16)
    o, grads = grads_of(lambda **a: linflow.lion(**a, decay="selective"), x, do)
    ro, rgrads = grads_of(lambda **a: lion_ref(**a, decay="selective"), {n: t.double() for n, t in x.items()},
                          do.double())
    assert grads["g"].dtype == torch.float32 and o.dtype == torch.bfloat16
    assert_rel_close(o, ro, 2e-2, "o")
    for name in rgrads:
        assert_rel_close(grads[name], rgrads[name], 4e-2, f"d{name}")


@pytest.mark.parametrize("decay", DECAYS)
def test_all_modes_and_chunk_sizes_agree(decay):
    B, T, H, K, V = 2, 300, 2, 8, 12
    inputs = make_lion_inputs(B, T, H, K, V, decay=decay, normalize=True)
    opts = options(decay, decay_convention="lion_code")
    with torch.no_grad():
        ref = linflow.lion(**inputs, **opts, mode="full")
        for mode, chunk in [("chunked", 16), ("chunked", 32), ("chunked", 64), ("chunked", 128), ("recurrent", 64),
                            ("auto", 64)]:
            assert_rel_close(linflow.lion(**inputs, **opts, mode=mode, chunk_size=chunk), ref, 1e-12, f"{mode} C{chunk}")


def test_fixed_decay_conventions_agree_and_selective_ones_differ():
    """For LION-d both conventions are one mask; for LION-s they differ (unless the gates are constant)."""
    x = make_lion_inputs(1, 40, 2, 8, 8, decay="fixed", normalize=True)
    a = linflow.lion(**x, decay="fixed", decay_convention="symmetric")
    b = linflow.lion(**x, decay="fixed", decay_convention="lion_code")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = make_lion_inputs(1, 40, 2, 8, 8, decay="selective", normalize=True)
    a = linflow.lion(**x, decay="selective", decay_convention="symmetric")
    b = linflow.lion(**x, decay="selective", decay_convention="lion_code")
    assert rel_err(a, b) > 1e-3
    # constant gates log(lam): selective equals fixed in both conventions
    lam = torch.tensor([0.7, 0.9], dtype=torch.float64)
    g = lam.log().expand(1, 40, 2).contiguous()
    ref = linflow.lion(x["q"], x["k"], x["v"], decay="fixed", lam=lam)
    for conv in ("symmetric", "lion_code"):
        torch.testing.assert_close(linflow.lion(x["q"], x["k"], x["v"], g, decay="selective", decay_convention=conv),
                                   ref)


def test_default_scale():
    """scale defaults to 1 with normalize=True (it cancels up to eps) and K^-1/2 without normalisation."""
    x = make_lion_inputs(1, 20, 2, 16, 8, decay="none", normalize=False)
    torch.testing.assert_close(linflow.lion(**x, normalize=False), linflow.lion(**x, normalize=False, scale=0.25))
    torch.testing.assert_close(linflow.lion(**x, normalize=False), lion_ref(**x, normalize=False, scale=0.25))
    x = make_lion_inputs(1, 20, 2, 16, 8, decay="none", normalize=True)
    torch.testing.assert_close(linflow.lion(**x), lion_ref(**x, scale=1.0))
    torch.testing.assert_close(linflow.lion(**x, scale=3.0), lion_ref(**x, scale=3.0))


def test_vanishing_denominator_gives_eps_not_nan():
    """A query orthogonal to every key: the denominator is 0 and eps keeps the output (and gradients) finite."""
    x = make_lion_inputs(1, 30, 1, 8, 4, decay="selective", normalize=True)
    x["q"][:, 5] = 0
    o, grads = grads_of(lambda **a: linflow.lion(**a, decay="selective", mode="chunked", chunk_size=16), x,
                        cotangent(1, 30, 1, 4, torch.float64))
    assert torch.isfinite(o).all() and (o[:, 5] == 0).all()
    assert all(torch.isfinite(gr).all() for gr in grads.values())
    with pytest.raises(RuntimeError, match="lion_fwd: eps"):
        linflow.lion(**x, decay="selective", eps=-1.0)


def test_long_sequence_stays_finite():
    """Strong decays over a long sequence: every decay product is exp of a non-positive exponent, so no overflow
    (a cumulative sum reaches ~ -1e5 here; exp(-c) of it would overflow)."""
    B, T, H, K, V = 1, 20000, 1, 8, 8
    gen = torch.Generator().manual_seed(0)
    q, k = (F.elu(torch.randn(B, T, H, K, generator=gen)) + 1 for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) * 3 - 4)
    g[:, 1000] = -30.0
    leaves = [t.requires_grad_() for t in (q, k, v, g)]
    o = linflow.lion(*leaves, decay="selective", mode="chunked")
    assert g.sum() < -1e4 and torch.isfinite(o).all()
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    with torch.no_grad():
        assert_rel_close(linflow.lion(q, k, v, g, decay="selective", mode="recurrent"), o, 1e-5, "recurrent")
        # a -30 gate cuts the sequence: the tail around token 1000 only sees its side
        s = slice(1000, 1100)
        alone = linflow.lion(q[:, s], k[:, s], v[:, s], g[:, s], decay="selective")
        assert_rel_close(o[:, 1010:1090], alone[:, 10:90], 1e-4, "segment after a cut")


@pytest.mark.parametrize("mode", ["chunked", "full", "recurrent"])
def test_empty_inputs(mode):
    for B, T in ((2, 0), (0, 5)):
        x = make_lion_inputs(B, T, 2, 4, 3, decay="selective", normalize=True)
        leaves = {n: t.requires_grad_(mode != "recurrent") for n, t in x.items()}
        o = linflow.lion(**leaves, decay="selective", mode=mode)
        assert o.shape == (B, T, 2, 3)
        if mode != "recurrent":
            o.sum().backward()
            assert all(t.grad.shape == t.shape for t in leaves.values())


def test_non_contiguous_inputs_give_same_result():
    x = make_lion_inputs(2, 50, 2, 8, 6, decay="selective+g_backward", normalize=True)
    views = {n: t.transpose(0, 1).contiguous().transpose(0, 1) for n, t in x.items()}
    views["q"] = torch.cat([x["q"], torch.full_like(x["q"], float("nan"))], -1)[..., :8]
    assert not any(t.is_contiguous() for t in views.values())
    do = cotangent(2, 50, 2, 6, torch.float64)
    fn = lambda **a: linflow.lion(**a, decay="selective", mode="chunked", chunk_size=16)  # noqa: E731
    o, grads = grads_of(fn, views, do)
    eo, egrads = grads_of(fn, x, do)
    assert_rel_close(o, eo, 1e-14, "o")
    for n in egrads:
        assert_rel_close(grads[n], egrads[n], 1e-14, f"d{n}")


def test_full_mode_exact_with_large_cumulative_gates():
    """full builds its T x T mask from whole-sequence cumulative log gates (here down to ~ -6000): in fp32 it still
    matches the fp64 result (the sums and differences are taken in fp64 inside)."""
    x = make_lion_inputs(1, 1500, 1, 8, 4, decay="selective", normalize=True)
    x["g"] = x["g"] * 4 - 2
    assert x["g"].sum() < -4000
    with torch.no_grad():
        ref = linflow.lion(**x, decay="selective", mode="chunked")
        o = linflow.lion(**{n: t.float() for n, t in x.items()}, decay="selective", mode="full")
    assert_rel_close(o, ref, 1e-5, "o (full, fp32)")


# ----------------------------------------------------------------------------------------------------------------
# variable length

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("decay", ["fixed", "selective+g_backward"])
def test_varlen_equals_separate_runs(decay, index_dtype, dtype):
    lengths = [1, 63, 0, 65, 130]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    T, H, K, V = offsets[-1], 2, 16, 8
    cu = torch.tensor(offsets, dtype=index_dtype)
    inputs = make_lion_inputs(1, T, H, K, V, decay=decay, normalize=True, dtype=dtype)
    do = cotangent(1, T, H, V, dtype)
    opts = options(decay, decay_convention="lion_code")
    tol = TOL[dtype]
    seq_names = ("q", "k", "v", "g", "g_backward")
    for mode in ("chunked", "full"):
        o, grads = grads_of(lambda **x: linflow.lion(**x, **opts, cu_seqlens=cu, mode=mode, chunk_size=32), inputs, do)
        ro, rgrads = grads_of(lambda **x: lion_ref(**x, **opts, cu_seqlens=cu), {n: t.double() for n, t in inputs.items()},
                              do.double())
        assert_rel_close(o, ro, tol, f"o ({mode})")
        for name in rgrads:
            assert_rel_close(grads[name], rgrads[name], tol, f"d{name} ({mode})")
        lam_grad = 0
        for a, b in zip(offsets[:-1], offsets[1:]):
            if a == b:
                continue
            seq = {n: (t[:, a:b] if n in seq_names else t) for n, t in inputs.items()}
            so, sgrads = grads_of(lambda **x: linflow.lion(**x, **opts, mode=mode, chunk_size=32), seq, do[:, a:b])
            assert_rel_close(o[:, a:b], so, tol, f"o, sequence [{a}, {b})")
            for name, grad in sgrads.items():
                if name == "lam":
                    lam_grad = lam_grad + grad
                else:
                    assert_rel_close(grads[name][:, a:b], grad, tol, f"d{name}, sequence [{a}, {b})")
        if "lam" in grads:
            assert_rel_close(grads["lam"], lam_grad, tol, "dlam = sum over sequences")
    with torch.no_grad():
        assert_rel_close(linflow.lion(**inputs, **opts, cu_seqlens=cu, mode="recurrent"), o, tol, "o (recurrent)")


# ----------------------------------------------------------------------------------------------------------------
# autograd, torch.library

GRADCHECK_CASES = [("none", True, "symmetric"), ("fixed", True, "symmetric"), ("fixed", False, "lion_code"),
                   ("selective", True, "symmetric"), ("selective+g_backward", False, "lion_code"),
                   ("selective", True, "lion_code")]


@pytest.mark.parametrize("mode", ["chunked", "full"])
@pytest.mark.parametrize("decay,normalize,convention", GRADCHECK_CASES)
def test_gradcheck_fp64(decay, normalize, convention, mode):
    # T = 19 with chunk 16: two chunks, the second partial
    inputs = make_lion_inputs(1, 19, 2, 3, 2, decay=decay, normalize=normalize)
    names = list(inputs)
    opts = options(decay, normalize=normalize, decay_convention=convention, mode=mode, chunk_size=16)

    def fn(*args):
        return linflow.lion(**dict(zip(names, args)), **opts)

    assert torch.autograd.gradcheck(fn, [inputs[n].clone().requires_grad_() for n in names])


def test_gradcheck_fp64_varlen():
    inputs = make_lion_inputs(1, 23, 1, 3, 2, decay="selective+g_backward", normalize=True)
    cu = torch.tensor([0, 5, 5, 23])
    names = list(inputs)

    def fn(*args):
        return linflow.lion(**dict(zip(names, args)), decay="selective", cu_seqlens=cu, mode="chunked", chunk_size=16)

    assert torch.autograd.gradcheck(fn, [inputs[n].clone().requires_grad_() for n in names])


def op_args(decay, normalize, varlen, dtype, mode="chunked"):
    B, T = (1, 40) if varlen else (2, 40)
    x = make_lion_inputs(B, T, 2, 8, 16, decay=decay, normalize=normalize, dtype=dtype)
    cu = torch.tensor([0, 10, 10, 40], dtype=torch.int32) if varlen else None
    return (x["q"], x["k"], x["v"], x.get("g"), x.get("g_backward"), x.get("lam"), cu), \
        (decay.split("+")[0], "lion_code", normalize, 1e-6, 0.5, mode, 16)


OPCHECK_VARIANTS = [("selective+g_backward", True, False), ("fixed", False, False), ("none", True, True),
                    ("selective", True, True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("decay,normalize,varlen", OPCHECK_VARIANTS)
def test_opcheck_lion_fwd(decay, normalize, varlen, dtype):
    tensors, opts = op_args(decay, normalize, varlen, dtype)
    tensors = tuple(t.requires_grad_() if t is not None and t.is_floating_point() else t for t in tensors)
    torch.library.opcheck(FWD, (*tensors, *opts))


@pytest.mark.parametrize("decay,normalize,varlen", OPCHECK_VARIANTS)
def test_opcheck_lion_bwd(decay, normalize, varlen):
    tensors, opts = op_args(decay, normalize, varlen, torch.float32)
    do = cotangent(*tensors[2].shape, torch.float32)
    torch.library.opcheck(BWD, (*tensors, do, *opts))


def test_opcheck_recurrent_forward():
    tensors, opts = op_args("selective", True, False, torch.float32, mode="recurrent")
    torch.library.opcheck(FWD, (*tensors, *opts), test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_op():
    torch._dynamo.reset()
    x = make_lion_inputs(2, 40, 2, 8, 8, decay="selective", normalize=True, dtype=torch.float32)
    do = cotangent(2, 40, 2, 8, torch.float32)

    def f(q, k, v, g):
        return linflow.lion(q, k, v, F.logsigmoid(g), decay="selective", mode="chunked", chunk_size=16) * 2

    compiled = torch.compile(f, fullgraph=True)
    o, grads = grads_of(compiled, x, do)
    eo, egrads = grads_of(f, x, do)
    assert_rel_close(o, eo, 1e-6, "o")
    for n in egrads:
        assert_rel_close(grads[n], egrads[n], 1e-6, f"d{n}")


# ----------------------------------------------------------------------------------------------------------------
# recurrent (inference) mode: forward only, O(T (K + V)) extra memory

def test_recurrent_mode_refuses_gradients():
    x = make_lion_inputs(1, 10, 1, 4, 4, decay="selective", normalize=True)
    x["q"].requires_grad_()
    with pytest.raises(RuntimeError, match="recurrent.*forward-only"):
        linflow.lion(**x, decay="selective", mode="recurrent")
    with torch.no_grad():
        linflow.lion(**x, decay="selective", mode="recurrent")  # fine without autograd
    tensors, opts = op_args("selective", True, False, torch.float32, mode="recurrent")
    with pytest.raises(RuntimeError, match=r"lion_bwd: mode=\"recurrent\" is the forward-only"):
        BWD(*tensors, cotangent(*tensors[2].shape, torch.float32), *opts)


def _peak_rss_bytes():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set size (VmHWM) to the current
        f.write("5")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_recurrent_mode_memory_is_linear_in_T_times_K_plus_V():
    """How it is measured: the process's peak resident set (VmHWM in /proc/self/status), reset just before the call
    through /proc/self/clear_refs. The C++ scans allocate their per-token outputs (2 x T x (V+1) floats) plus one
    K x (V+1) state; large blocks come from mmap and go back to the OS on free, so a per-token K x V state would
    show up as T*K*V*4 bytes (here 64 MiB). We require the peak growth to be within a few multiples of the
    inputs' size, T*(2K+2V)*4 bytes (and far below one state per token), and ``full`` mode (T x T) to cost more."""
    T, K, V = 4096, 64, 64
    gen = torch.Generator().manual_seed(0)
    q, k = (F.elu(torch.randn(1, T, 1, K, generator=gen)) + 1 for _ in range(2))
    v = torch.randn(1, T, 1, V, generator=gen)
    g = F.logsigmoid(torch.randn(1, T, 1, generator=gen))
    io_bytes = T * (2 * K + 2 * V) * 4  # q, k, v, o
    state_per_token_bytes = T * K * V * 4

    def growth(mode):
        with torch.no_grad():
            linflow.lion(q[:, :64], k[:, :64], v[:, :64], g[:, :64], decay="selective", mode=mode)  # warm-up
            base = _reset_peak_rss() or _peak_rss_bytes()
            o = linflow.lion(q, k, v, g, decay="selective", mode=mode)
            peak = _peak_rss_bytes() - base
        del o
        return peak

    rec = growth("recurrent")
    assert rec <= 4 * io_bytes + (4 << 20), f"recurrent: peak +{rec / 2**20:.1f} MiB, inputs {io_bytes / 2**20:.1f} MiB"
    assert rec < state_per_token_bytes / 8
    full = growth("full")  # T x T fp32 matrices: >= 64 MiB each
    assert full > 4 * rec + (32 << 20), f"full: +{full / 2**20:.1f} MiB vs recurrent +{rec / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------------------------
# bad inputs: RuntimeError naming the op and the argument

def valid_args(**changes):
    x = make_lion_inputs(2, 5, 3, 8, 4, decay="selective+g_backward", normalize=True, dtype=torch.float32)
    a = dict(q=x["q"], k=x["k"], v=x["v"], g=x["g"], g_backward=x["g_backward"], lam=None, cu_seqlens=None,
             decay="selective", decay_convention="symmetric", normalize=True, eps=1e-6, scale=1.0, mode="chunked",
             chunk_size=64)
    a.update({n: (f(a) if callable(f) else f) for n, f in changes.items()})
    return a


FWD_NAMES = ["q", "k", "v", "g", "g_backward", "lam", "cu_seqlens", "decay", "decay_convention", "normalize", "eps",
             "scale", "mode", "chunk_size"]
LAM = torch.tensor([0.5, 0.6, 0.7])

ERROR_CASES = [
    ("q_rank3", dict(q=lambda a: a["q"][0]), "q"),
    ("k_time", dict(k=lambda a: a["k"][:, :-1]), "k"),
    ("k_head_dim", dict(k=lambda a: a["k"][..., :-1]), "k"),
    ("v_heads", dict(v=lambda a: a["v"][:, :, 1:]), "v"),
    ("v_dtype", dict(v=lambda a: a["v"].double()), "q, k, v must share one dtype"),
    ("q_int", dict(q=lambda a: a["q"].int(), k=lambda a: a["k"].int(), v=lambda a: a["v"].int()), "q"),
    ("head_dim_300", dict(v=lambda a: a["v"].new_ones(2, 5, 3, 300)), "head dim V"),
    ("g_shape", dict(g=lambda a: a["g"][:, :-1]), "g"),
    ("g_int", dict(g=lambda a: a["g"].int()), "g"),
    ("g_backward_shape", dict(g_backward=lambda a: a["g_backward"][..., :1]), "g_backward"),
    ("g_positive", dict(g=lambda a: a["g"].abs()), "g is a log decay"),
    ("bad_decay", dict(decay="exp"), "decay"),
    ("bad_convention", dict(decay_convention="asymmetric"), "decay_convention"),
    ("bad_mode", dict(mode="quadratic"), "mode"),
    ("bad_chunk", dict(chunk_size=48), "chunk_size"),
    ("negative_eps", dict(eps=-1e-3), "eps"),
    ("nan_scale", dict(scale=float("nan")), "scale"),
    ("selective_without_g", dict(g=None), r"decay=\"selective\" needs g"),
    ("selective_with_lam", dict(lam=LAM), r"lam was given"),
    ("none_with_g", dict(decay="none", g_backward=None), r"decay=\"none\" takes no g"),
    ("none_with_g_backward", dict(decay="none", g=None), r"decay=\"none\" takes no .*g_backward"),
    ("none_with_lam", dict(decay="none", g=None, g_backward=None, lam=LAM), r"decay=\"none\" takes no .*lam"),
    ("fixed_without_lam", dict(decay="fixed", g=None, g_backward=None), r"decay=\"fixed\" needs lam"),
    ("fixed_with_g", dict(decay="fixed", g_backward=None, lam=LAM), r"decay=\"fixed\" takes lam only, but g"),
    ("lam_shape", dict(decay="fixed", g=None, g_backward=None, lam=LAM[:2]), "lam"),
    ("lam_one", dict(decay="fixed", g=None, g_backward=None, lam=torch.tensor([0.5, 1.0, 0.7])), r"lam must lie in \(0, 1\)"),
    ("lam_zero", dict(decay="fixed", g=None, g_backward=None, lam=torch.tensor([0.0, 0.5, 0.7])), r"lam must lie in \(0, 1\)"),
    ("lam_negative", dict(decay="fixed", g=None, g_backward=None, lam=-LAM), r"lam must lie in \(0, 1\)"),
    ("cu_seqlens_batch", dict(cu_seqlens=torch.tensor([0, 2, 5])), "cu_seqlens"),
    ("cu_seqlens_end", dict(**{n: (lambda a, n=n: a[n][:1]) for n in ("q", "k", "v", "g", "g_backward")},
                            cu_seqlens=torch.tensor([0, 2, 4])), r"cu_seqlens\[-1\]"),
    ("cu_seqlens_float", dict(**{n: (lambda a, n=n: a[n][:1]) for n in ("q", "k", "v", "g", "g_backward")},
                              cu_seqlens=torch.tensor([0.0, 5.0])), "cu_seqlens"),
]


@pytest.mark.parametrize("op", ["lion_fwd", "lion_bwd"])
@pytest.mark.parametrize("changes,argument", [pytest.param(c, a, id=i) for i, c, a in ERROR_CASES])
def test_rejects_bad_argument(changes, argument, op):
    a = valid_args(**changes)
    with pytest.raises(RuntimeError, match=rf"{op}: (.*\W)?{argument}"):
        if op == "lion_fwd":
            FWD(*[a[n] for n in FWD_NAMES])
        else:
            do = torch.randn(2, 5, 3, 4)
            BWD(*[a[n] for n in FWD_NAMES[:7]], do, *[a[n] for n in FWD_NAMES[7:]])


def test_bwd_rejects_bad_grad_o():
    a = valid_args()
    with pytest.raises(RuntimeError, match=r"lion_bwd: (.*\W)?grad_o"):
        BWD(*[a[n] for n in FWD_NAMES[:7]], torch.randn(2, 5, 3, 5), *[a[n] for n in FWD_NAMES[7:]])


def test_public_function_reports_op_errors():
    x = make_lion_inputs(1, 6, 2, 4, 4, decay="selective", normalize=True)
    with pytest.raises(RuntimeError, match=r"lion_fwd: decay=\"none\" takes no g"):
        linflow.lion(x["q"], x["k"], x["v"], x["g"])
    with pytest.raises(RuntimeError, match=r"lion_fwd: decay=\"selective\" needs g"):
        linflow.lion(x["q"], x["k"], x["v"], decay="selective")
    with pytest.raises(RuntimeError, match=r"lion_fwd: lam must lie in \(0, 1\)"):
        linflow.lion(x["q"], x["k"], x["v"], decay="fixed", lam=torch.tensor([0.5, 1.5]))


# ----------------------------------------------------------------------------------------------------------------
# CUDA (the ATen form registered for CUDA; skipped without a device)

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("decay", DECAYS)
def test_cuda_matches_reference(decay, dtype):
    B, T, H, K, V = 2, 130, 2, 32, 16
    inputs = make_lion_inputs(B, T, H, K, V, decay=decay, normalize=True, dtype=dtype)
    do = cotangent(B, T, H, V, dtype)
    opts = options(decay, decay_convention="lion_code")
    ro, rgrads = grads_of(lambda **x: lion_ref(**x, **opts), {n: t.double() for n, t in inputs.items()}, do.double())
    cuda = {n: t.cuda() for n, t in inputs.items()}
    tol = 5e-3 if dtype == torch.float32 else 4e-2  # TF32 matmuls / bf16 rounding
    for mode in ("chunked", "full"):
        o, grads = grads_of(lambda **x: linflow.lion(**x, **opts, mode=mode), cuda, do.cuda())
        assert o.device.type == "cuda" and o.dtype == dtype
        assert_rel_close(o.cpu(), ro, tol, f"o ({mode})")
        for n in rgrads:
            assert_rel_close(grads[n].cpu(), rgrads[n], tol, f"d{n} ({mode})")
    with torch.no_grad():
        assert_rel_close(linflow.lion(**cuda, **opts, mode="recurrent").cpu(), ro, tol, "o (recurrent)")


# ----------------------------------------------------------------------------------------------------------------
# CUDA sweep kernels (csrc/lion/kernels.cuh): the forward of mode "chunked" (and "auto" beyond one chunk) with bf16 /
# fp16 inputs, chunk_size 64, K <= 128. Edge cases of the kernel: partial last chunk, T = 1, exactly one chunk, K != V,
# V not a multiple of 16 / 8, V > 128 (two v-tiles), K not a multiple of 8 (synchronous tile loads), several heads.
# Tolerance: relative Frobenius error vs the fp64 oracle on the same rounded inputs; the kernel rounds the masked
# score block to 16 bits (as PyTorch's half matmuls would) and accumulates in fp32.

KERNEL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
KERNEL_SHAPES = [  # (B, T, H, K, V)
    (2, 130, 2, 32, 16),
    (1, 1, 3, 16, 16),
    (1, 64, 2, 64, 64),
    (2, 200, 3, 128, 128),
    (1, 150, 2, 64, 40),
    (1, 129, 1, 128, 200),
    (1, 100, 2, 20, 13),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
@pytest.mark.parametrize("convention", ["symmetric", "lion_code"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("decay", DECAYS)
def test_cuda_kernel_forward_matches_reference(decay, normalize, convention, shape, dtype):
    B, T, H, K, V = shape
    inputs = make_lion_inputs(B, T, H, K, V, decay=decay, normalize=normalize, dtype=dtype, seed=T + K + V)
    opts = options(decay, normalize=normalize, decay_convention=convention)
    ro = lion_ref(**{n: t.double() for n, t in inputs.items()}, **opts)
    cuda = {n: t.cuda() for n, t in inputs.items()}
    with torch.no_grad():
        for mode in ("chunked", "auto") if T > 64 else ("chunked",):
            o = linflow.lion(**cuda, **opts, mode=mode)
            assert o.dtype == dtype and o.shape == (B, T, H, V)
            assert_rel_close(o.cpu(), ro, KERNEL_TOL[dtype], f"o ({mode})")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("decay", DECAYS)
def test_cuda_kernel_forward_varlen(decay, normalize, dtype):
    lengths = [1, 63, 0, 65, 130, 64, 2]  # empty and short sequences, chunk boundaries
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    T, H, K, V = offsets[-1], 3, 64, 48
    cu = torch.tensor(offsets, dtype=torch.int32)
    inputs = make_lion_inputs(1, T, H, K, V, decay=decay, normalize=normalize, dtype=dtype, seed=7)
    for convention in ("symmetric", "lion_code"):
        opts = options(decay, normalize=normalize, decay_convention=convention)
        ro = lion_ref(**{n: t.double() for n, t in inputs.items()}, **opts, cu_seqlens=cu)
        cuda = {n: t.cuda() for n, t in inputs.items()}
        with torch.no_grad():
            o = linflow.lion(**cuda, **opts, cu_seqlens=cu.cuda(), mode="chunked")
            assert_rel_close(o.cpu(), ro, KERNEL_TOL[dtype], f"o ({convention})")
            for a, b in zip(offsets[:-1], offsets[1:]):  # every sequence alone (no attention across a boundary)
                if a == b:
                    continue
                seq = {n: (t[:, a:b] if t.dim() > 1 else t) for n, t in cuda.items()}
                so = linflow.lion(**seq, **opts, mode="chunked")
                assert_rel_close(o[:, a:b].cpu(), so.cpu(), KERNEL_TOL[dtype], f"o, sequence [{a}, {b})")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cuda_kernel_forward_long_sequence_strong_decay(dtype):
    """Many chunks with strong selective decay (cumulative gates near -1e3): the state never overflows, the output
    matches the oracle; plus the scale / eps options of the unnormalised and normalised forms."""
    B, T, H, K, V = 1, 1000, 2, 64, 64
    x = make_lion_inputs(B, T, H, K, V, decay="selective+g_backward", normalize=True, dtype=dtype, seed=3)
    x["g"] = (x["g"].double() * 3).to(dtype)
    for opts in (dict(decay="selective"), dict(decay="selective", scale=0.37, eps=1e-3),
                 dict(decay="selective", normalize=False, scale=0.05)):
        ro = lion_ref(**{n: t.double() for n, t in x.items()}, **opts)
        with torch.no_grad():
            o = linflow.lion(**{n: t.cuda() for n, t in x.items()}, **opts, mode="chunked")
        assert_rel_close(o.cpu(), ro, KERNEL_TOL[dtype], f"o {opts}")


@pytest.mark.cuda
def test_cuda_kernel_forward_then_aten_backward():
    """The kernel forward feeds autograd; the backward (ATen form on CUDA) still matches the oracle."""
    B, T, H, K, V = 2, 130, 2, 32, 16
    inputs = make_lion_inputs(B, T, H, K, V, decay="selective", normalize=True, dtype=torch.bfloat16)
    do = cotangent(B, T, H, V, torch.bfloat16)
    opts = options("selective")
    ro, rgrads = grads_of(lambda **x: lion_ref(**x, **opts), {n: t.double() for n, t in inputs.items()}, do.double())
    o, grads = grads_of(lambda **x: linflow.lion(**x, **opts, mode="chunked"), {n: t.cuda() for n, t in inputs.items()},
                        do.cuda())
    assert_rel_close(o.cpu(), ro, KERNEL_TOL[torch.bfloat16], "o")
    for n in rgrads:
        assert_rel_close(grads[n].cpu(), rgrads[n], 4e-2, f"d{n}")
