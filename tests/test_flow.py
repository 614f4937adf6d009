"""linflow.flow_delta_rule (rank-R delta rule: product / simultaneous form) and linflow.flow_transition against the
float64 token-by-token recurrence flow_ref in reference.py.

Tolerances (relative Frobenius error vs the fp64 oracle on the same rounded inputs): fp64 1e-10, fp32 2e-5 (CPU),
5e-3 (CUDA, TF32 room); bf16 / fp16 are checked against a loose bound (the op keeps the state in fp32).
"""
from typing import NamedTuple

import itertools

import pytest
import torch
import torch.nn.functional as F

import linflow
from conftest import (CAP, HAS_CUDA, STATE_DTYPE, TOL, assert_rel_close, cotangents, leaves, low_precision_tol, rel_err,
                      values_and_grads)
from reference import flow_ref, l2norm_ref

FWD, BWD, TRANSITION = torch.ops.linflow.flow_fwd, torch.ops.linflow.flow_bwd, torch.ops.linflow.flow_transition
FORMS = ["product", "simultaneous"]


def make_flow_inputs(B, T, R, H, K, V, *, dtype=torch.float32, device="cpu", gated=True, initial_state=False,
                     N=None, seed=0, normalize_keys=True):
    """Random inputs drawn in float64 on the CPU from ``seed`` (q, k, v ~ N(0, 1), keys L2-normalised,
    beta ~ U(0, 1), g = logsigmoid(N(0, 1)), initial_state ~ N(0, 1/K)), then rounded to ``dtype`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    q = torch.randn(B, T, H, K, **f64)
    k = torch.randn(B, T, R, H, K, **f64)
    if normalize_keys:
        k = l2norm_ref(k)
    v = torch.randn(B, T, R, H, V, **f64)
    beta = torch.rand(B, T, R, H, **f64)
    g = F.logsigmoid(torch.randn(B, T, H, **f64)) if gated else None
    h0 = torch.randn(B if N is None else N, H, K, V, **f64) * K**-0.5 if initial_state else None
    to = lambda x, dt: None if x is None else x.to(device=device, dtype=dt).contiguous()  # noqa: E731
    return dict(q=to(q, dtype), k=to(k, dtype), v=to(v, dtype), beta=to(beta, dtype), g=to(g, dtype),
                initial_state=to(h0, STATE_DTYPE[dtype]))


class Case(NamedTuple):
    T: int
    R: int
    form: str
    gated: bool = True
    h0: bool = False
    final: bool = True
    l2: bool = False
    K: int = 16
    V: int = 8
    B: int = 2
    H: int = 2

    def __str__(self):
        return "-".join([f"T{self.T}", f"R{self.R}", self.form[:4], "gated" if self.gated else "ungated",
                         "h0" if self.h0 else "noh0", "ht" if self.final else "noht"] + (["l2"] if self.l2 else []))


# A covering set: both forms x R in {1, 2, 3, 4} x T in {1, 63, 65, 130}, gated / ungated, with / without initial and
# final state (R = 3 gives 63-row chunks: 21 whole tokens).
CASES = [
    Case(T=1, R=2, form="product", h0=True),
    Case(T=1, R=3, form="simultaneous", gated=False, final=False),
    Case(T=63, R=1, form="product", h0=True),
    Case(T=63, R=4, form="simultaneous", h0=True),
    Case(T=65, R=3, form="product", gated=False, h0=True, l2=True),
    Case(T=65, R=2, form="simultaneous", final=False),
    Case(T=130, R=2, form="product", h0=True),
    Case(T=130, R=3, form="simultaneous", gated=False, h0=True),
    Case(T=130, R=4, form="product", gated=True, final=False),
    Case(T=65, R=1, form="simultaneous", gated=False),
]


def run_op(case, **kw):
    def fn(q, k, v, beta, g, initial_state):
        return linflow.flow_delta_rule(q, k, v, beta, g, form=case.form, initial_state=initial_state,
                                       output_final_state=case.final, use_qk_l2norm=case.l2, **kw)
    return fn


def run_ref(case):
    def fn(q, k, v, beta, g, initial_state):
        o, ht = flow_ref(q, k, v, beta, g, form=case.form, initial_state=initial_state, use_qk_l2norm=case.l2)
        return o, (ht if case.final else None)
    return fn


def case_inputs(case, dtype, device, seed=0):
    inputs = make_flow_inputs(case.B, case.T, case.R, case.H, case.K, case.V, dtype=dtype, device=device,
                              gated=case.gated, initial_state=case.h0, seed=seed, normalize_keys=not case.l2)
    do, dht = cotangents((case.B, case.T, case.H, case.V),
                         (case.B, case.H, case.K, case.V) if case.final else None, dtype=dtype, device=device,
                         seed=seed + 1)
    return inputs, do, dht


def oracle(case, inputs, do, dht):
    return values_and_grads(run_ref(case), leaves(inputs, torch.float64), do.double(),
                            dht.double() if dht is not None else None)


def precision_params():
    params = [("cpu", torch.float64), ("cpu", torch.float32)] + ([("cuda", torch.float32)] if HAS_CUDA else [])
    return [pytest.param(d, t, id=f"{d}-{str(t)[6:]}") for d, t in params]


@pytest.mark.parametrize("device,dtype", precision_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_values_and_grads_match_reference(case, device, dtype):
    inputs, do, dht = case_inputs(case, dtype, device)
    o, ht, grads = values_and_grads(run_op(case), leaves(inputs), do, dht)
    eo, eht, egrads = oracle(case, inputs, do, dht)
    tol = TOL[(device, dtype)]
    assert o.dtype == dtype
    assert_rel_close(o, eo.to(o.device), tol, "o")
    if case.final:
        assert ht.dtype == STATE_DTYPE[dtype]
        assert_rel_close(ht, eht.to(ht.device), tol, "final_state")
    assert set(grads) == set(egrads)
    for name in grads:
        assert_rel_close(grads[name], egrads[name].to(grads[name].device), tol, f"d{name}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("R", [1, 2, 3])
def test_parallel_scan_equals_sequential(form, R):
    """Values and all gradients; T = 150 gives 3..5 chunks, so the scan runs several rounds."""
    case = Case(T=150, R=R, form=form, h0=True)
    inputs, do, dht = case_inputs(case, torch.float32, "cpu", seed=3)
    o, ht, grads = values_and_grads(run_op(case, scan="sequential"), leaves(inputs), do, dht)
    po, pht, pgrads = values_and_grads(run_op(case, scan="parallel"), leaves(inputs), do, dht)
    assert_rel_close(po, o, 1e-5, "o")
    assert_rel_close(pht, ht, 1e-5, "final_state")
    for name in grads:
        assert_rel_close(pgrads[name], grads[name], 1e-5, f"d{name}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("segment", [64, 128, 1000])
def test_segment_scan_varlen_equals_sequential(form, segment):
    """The segment scan over ragged sequences (one empty, one shorter than a segment, one of several segments):
    values, final states and every gradient (initial state included) equal the sequential pass, in fp64."""
    lengths = [200, 0, 37, 330]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int64)
    inputs = make_flow_inputs(1, sum(lengths), 2, 2, 16, 8, dtype=torch.float64, gated=True, initial_state=True,
                              N=len(lengths), seed=5)
    do, dht = cotangents((1, sum(lengths), 2, 8), (len(lengths), 2, 16, 8), dtype=torch.float64, device="cpu")

    def run(scan):
        return lambda **a: linflow.flow_delta_rule(**a, form=form, cu_seqlens=cu, output_final_state=True, scan=scan,
                                                   segment=segment)
    o, ht, grads = values_and_grads(run("sequential"), leaves(inputs), do, dht)
    po, pht, pgrads = values_and_grads(run("parallel"), leaves(inputs), do, dht)
    ro, rht, rgrads = values_and_grads(lambda **a: flow_ref(**a, form=form, cu_seqlens=cu), leaves(inputs), do, dht)
    assert_rel_close(po, o, 1e-12, "o")
    assert_rel_close(pht, ht, 1e-12, "final_state")
    assert_rel_close(po, ro, 1e-10, "o vs reference")
    assert_rel_close(pht, rht, 1e-10, "final_state vs reference")
    for name in grads:
        assert_rel_close(pgrads[name], grads[name], 1e-12, f"d{name}")
        assert_rel_close(pgrads[name], rgrads[name], 1e-10, f"d{name} vs reference")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("form", FORMS)
def test_segment_scan_cuda_bf16_matches_sequential(form):
    """On the GPU's tensor-core path (bf16): the segment scan with its default segments (sized to fill the device)
    against the sequential pass, within bf16 tolerance, values and gradients."""
    case = Case(T=1000, R=2, form=form, h0=True, K=64, V=64, B=1)
    inputs, do, dht = case_inputs(case, torch.bfloat16, "cuda", seed=7)
    o, ht, grads = values_and_grads(run_op(case, scan="sequential"), leaves(inputs), do, dht)
    po, pht, pgrads = values_and_grads(run_op(case, scan="parallel"), leaves(inputs), do, dht)
    value_tol, grad_tol = CAP[torch.bfloat16]
    assert_rel_close(po, o, value_tol, "o")
    assert_rel_close(pht, ht, value_tol, "final_state")
    for name in grads:
        assert_rel_close(pgrads[name], grads[name], grad_tol, f"d{name}")


def test_auto_scan_rule():
    """scan="auto" decides from shapes alone: the segment scan only on CUDA for few (sequence, head) pairs of long
    sequences (cu_seqlens: its shape, never its values)."""
    from linflow.ops.scan import AUTO_MAX_SEQ_HEADS as MAX_NH, AUTO_MIN_TOKENS as MIN_T, resolve_scan

    class Shaped:  # shape and device of q, without allocating a long tensor
        def __init__(self, B, T, H, cuda=True):
            self.shape, self.is_cuda = (B, T, H, 128), cuda

    assert resolve_scan("auto", Shaped(1, MIN_T, MAX_NH), None) == "parallel"
    assert resolve_scan("auto", Shaped(1, MIN_T, MAX_NH, cuda=False), None) == "sequential"
    assert resolve_scan("auto", Shaped(1, MIN_T, 2 * MAX_NH), None) == "sequential"
    assert resolve_scan("auto", Shaped(1, MIN_T - 1, 1), None) == "sequential"
    assert resolve_scan("auto", Shaped(1, 2 * MIN_T, 1), torch.zeros(3)) == "parallel"  # 2 sequences, mean MIN_T
    assert resolve_scan("auto", Shaped(1, 2 * MIN_T, 1), torch.zeros(4)) == "sequential"
    assert resolve_scan("sequential", Shaped(1, MIN_T, 1), None) == "sequential"
    assert resolve_scan("parallel", Shaped(64, 64, 64), None) == "parallel"


@pytest.mark.parametrize("form", FORMS)
def test_auto_scan_is_sequential_on_cpu(form):
    case = Case(T=70, R=2, form=form)
    inputs, _, _ = case_inputs(case, torch.float32, "cpu")
    a, _ = run_op(case, scan="auto")(**inputs)
    s, _ = run_op(case, scan="sequential")(**inputs)
    assert torch.equal(a, s)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_rank_one_is_the_delta_rule(form, gated):
    """R = 1: both forms are the delta rule, through the same code path (bit-for-bit, values and gradients)."""
    case = Case(T=100, R=1, form=form, gated=gated, h0=True)
    inputs, do, dht = case_inputs(case, torch.float32, "cpu")
    o, ht, grads = values_and_grads(run_op(case), leaves(inputs), do, dht)

    def delta(q, k, v, beta, g, initial_state):
        return linflow.delta_rule(q, k[:, :, 0], v[:, :, 0], beta[:, :, 0], g, initial_state=initial_state,
                                  output_final_state=True)
    eo, eht, egrads = values_and_grads(delta, leaves(inputs), do, dht)
    assert torch.equal(o, eo) and torch.equal(ht, eht)
    for name in grads:
        assert torch.equal(grads[name], egrads[name]), name


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scan", ["sequential", "parallel"])
def test_varlen_equals_separate_runs(form, scan):
    """Packed sequences (one empty, one shorter than a chunk, one spanning chunks) = separate runs, values and
    gradients, with per-sequence initial and final states."""
    lens = [20, 0, 3, 90]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    R, N, T = 3, len(lens), sum(lens)
    inputs = make_flow_inputs(1, T, R, 2, 16, 8, dtype=torch.float64, initial_state=True, N=N, seed=5)
    do, dht = cotangents((1, T, 2, 8), (N, 2, 16, 8), dtype=torch.float64, device="cpu", seed=6)

    def packed(**a):
        return linflow.flow_delta_rule(**a, form=form, scan=scan, cu_seqlens=cu, output_final_state=True)

    def separate(q, k, v, beta, g, initial_state):
        outs, states = [], []
        for n, (b, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            o, ht = linflow.flow_delta_rule(q[:, b:e], k[:, b:e], v[:, b:e], beta[:, b:e], g[:, b:e], form=form,
                                            scan=scan, initial_state=initial_state[n:n + 1], output_final_state=True)
            outs.append(o)
            states.append(ht)
        return torch.cat(outs, 1), torch.cat(states, 0)

    o, ht, grads = values_and_grads(packed, leaves(inputs), do, dht)
    eo, eht, egrads = values_and_grads(separate, leaves(inputs), do, dht)
    ro, rht = flow_ref(**inputs, form=form, cu_seqlens=cu)
    assert_rel_close(o, eo, 1e-12, "o")
    assert_rel_close(ht, eht, 1e-12, "final_state")
    assert_rel_close(o, ro, 1e-10, "o vs reference")
    assert_rel_close(ht, rht, 1e-10, "final_state vs reference")
    for name in grads:
        assert_rel_close(grads[name], egrads[name], 1e-12, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("form", FORMS)
def test_low_precision_within_2x_pytorch_error(form, dtype):
    """bf16 / fp16 inputs (STYLE.md): output and gradients in the input dtype, fp32 state, and an error vs the fp64
    oracle within 2x that of the same recurrence run by PyTorch in the low precision (test_delta_rule's rule)."""
    case = Case(T=65, R=2, form=form, h0=True)
    inputs, do, dht = case_inputs(case, dtype, "cpu")
    o, ht, grads = values_and_grads(run_op(case), leaves(inputs), do, dht)
    eo, eht, egrads = oracle(case, inputs, do, dht)

    def low(q, k, v, beta, g, initial_state):
        return flow_ref(q, k, v, beta, g, form=form, initial_state=initial_state, dtype=dtype)
    bo, bht, bgrads = values_and_grads(low, leaves(inputs), do, dht.to(dtype))
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_rel_close(o, eo, low_precision_tol(rel_err(bo, eo), dtype, False), "o")
    assert_rel_close(ht, eht, low_precision_tol(rel_err(bht, eht), dtype, False), "final_state")
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype
        tol = low_precision_tol(rel_err(bgrads[name], egrads[name]), dtype, True)
        assert_rel_close(grads[name], egrads[name], tol, f"d{name}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scan", ["sequential", "parallel"])
def test_strong_gates_stay_finite(form, scan):
    """Near-resets inside chunks: every exponent the op takes is <= 0, so no inf / NaN appears. A gate of -1e4 is
    exact only to ulp(1e4) ~ 1e-3 in fp32 once differences of within-chunk cumulative gates are taken (the chunk
    form's known limit, shared with the delta rule and fla), hence the looser bound in that case."""
    for reset, tol in ((-30.0, 2e-5), (-1e4, 1e-3)):
        case = Case(T=130, R=3, form=form, h0=True)
        inputs, do, dht = case_inputs(case, torch.float32, "cpu", seed=13)
        inputs["g"][:, 5] = -30.0
        inputs["g"][:, 70] = reset
        o, ht, grads = values_and_grads(run_op(case, scan=scan), leaves(inputs), do, dht)
        eo, eht, egrads = oracle(case, inputs, do, dht)
        assert_rel_close(o, eo, tol, f"o (reset {reset})")
        assert_rel_close(ht, eht, tol, f"final_state (reset {reset})")
        for name in grads:
            assert_rel_close(grads[name], egrads[name], tol, f"d{name} (reset {reset})")


def test_empty_sequence_returns_initial_state():
    inputs = make_flow_inputs(2, 0, 2, 2, 8, 4, dtype=torch.float32, initial_state=True)
    o, ht = linflow.flow_delta_rule(**inputs, output_final_state=True)
    assert o.shape == (2, 0, 2, 4)
    assert torch.equal(ht, inputs["initial_state"])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scan", ["sequential", "parallel"])
def test_gradcheck_fp64(form, scan):
    # T = 25 at R = 3: 75 rows in chunks of 63 -> two chunks (one scan round), the last partial
    inputs = make_flow_inputs(1, 25, 3, 1, 4, 3, dtype=torch.float64, initial_state=True, seed=7)
    names = list(inputs)

    def fn(*args):
        return linflow.flow_delta_rule(*args[:5], initial_state=args[5], form=form, scan=scan,
                                       output_final_state=True)

    args = [inputs[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_fp64_varlen_l2norm():
    inputs = make_flow_inputs(1, 13, 2, 1, 4, 3, dtype=torch.float64, initial_state=True, N=3, seed=8,
                              normalize_keys=False)
    cu = torch.tensor([0, 4, 4, 13])

    def fn(*args):
        return linflow.flow_delta_rule(*args[:5], initial_state=args[5], form="simultaneous", cu_seqlens=cu,
                                       output_final_state=True, use_qk_l2norm=True)

    args = [inputs[n].clone().requires_grad_() for n in inputs]
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", ["gated-h0-ht", "ungated-parallel", "varlen-gated-h0-ht"])
def test_opcheck_flow_fwd_bwd(form, variant):
    varlen = variant.startswith("varlen")
    gated, h0, ht = "-gated" in f"-{variant}", "h0" in variant, "ht" in variant
    scan = "parallel" if "parallel" in variant else "sequential"
    B, N = (1, 3) if varlen else (2, 2)
    inputs = make_flow_inputs(B, 40, 2, 2, 8, 4, dtype=torch.float64, gated=gated, initial_state=h0, N=N)
    cu = torch.tensor([0, 10, 10, 40], dtype=torch.int64) if varlen else None
    args = [inputs[n] for n in ("q", "k", "v", "beta", "g", "initial_state")]
    do, dht = cotangents((B, 40, 2, 4), (N, 2, 8, 4) if ht else None, dtype=torch.float64, device="cpu")
    torch.library.opcheck(BWD, (*args, cu, do, dht, 0.25, form, scan))
    args = [x.requires_grad_() if x is not None else None for x in args]
    torch.library.opcheck(FWD, (*args, cu, 0.25, ht, form, scan))


@pytest.mark.parametrize("scan", ["sequential", "parallel"])
def test_compile_fullgraph_forward_backward(scan):
    """fullgraph capture through the fake and autograd registrations (aot_eager: no C++ codegen, fast)."""
    torch._dynamo.reset()
    inputs = make_flow_inputs(2, 30, 2, 2, 8, 8, dtype=torch.float32, initial_state=True, normalize_keys=False)
    do, dht = cotangents((2, 30, 2, 8), (2, 2, 8, 8), dtype=torch.float32, device="cpu")

    def layer(q, k, v, beta, g, initial_state):
        o, ht = linflow.flow_delta_rule(q, k, v, beta.sigmoid(), g, form="simultaneous", scan=scan,
                                        initial_state=initial_state, output_final_state=True, use_qk_l2norm=True)
        return o * 2, ht

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    o, ht, grads = values_and_grads(compiled, leaves(inputs), do, dht)
    eo, eht, egrads = values_and_grads(layer, leaves(inputs), do, dht)
    assert_rel_close(o, eo, 1e-6, "o")
    assert_rel_close(ht, eht, 1e-6, "final_state")
    for name in egrads:
        assert_rel_close(grads[name], egrads[name], 1e-6, f"d{name}")


# ----------------------------------------------------------------------------------------------------------------
# flow_transition: per-segment affine maps

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("R,segment", [(1, 16), (2, 7), (3, 32)])
def test_composed_transitions_give_final_state(form, R, segment):
    """Composing the (P, Q) of all segments maps S_0 to S_T; every prefix gives the state after that segment."""
    T = 50
    inputs = make_flow_inputs(2, T, R, 2, 8, 4, dtype=torch.float64, initial_state=True, seed=9)
    P, Q = linflow.flow_transition(inputs["k"], inputs["v"], inputs["beta"], inputs["g"], form=form, segment=segment)
    NS = -(-T // segment)
    assert P.shape == (2, NS, 2, 8, 8) and Q.shape == (2, NS, 2, 8, 4)
    S = inputs["initial_state"]
    for s in range(NS):
        S = P[:, s] @ S + Q[:, s]
        end = min((s + 1) * segment, T)
        sub = {n: x[:, :end] if n != "initial_state" else x for n, x in inputs.items()}
        _, expect = flow_ref(**sub, form=form)
        assert_rel_close(S, expect, 1e-10, f"state after segment {s}")


def test_transition_gradcheck_and_opcheck():
    inputs = make_flow_inputs(1, 9, 2, 1, 3, 2, dtype=torch.float64, seed=10)
    args = [inputs[n].clone().requires_grad_() for n in ("k", "v", "beta", "g")]
    assert torch.autograd.gradcheck(lambda *a: linflow.flow_transition(*a, form="simultaneous", segment=4), args)
    torch.library.opcheck(TRANSITION, (*args, "product", 4), test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------------------------
# bad inputs: a RuntimeError naming the op and the argument (tests/test_errors.py style)

def valid_args():
    a = make_flow_inputs(2, 5, 3, 2, 8, 4, dtype=torch.float32, initial_state=True)
    return dict(a, cu_seqlens=None, scale=0.5, output_final_state=True, form="product", scan="sequential")


FWD_ARGS = ["q", "k", "v", "beta", "g", "initial_state", "cu_seqlens", "scale", "output_final_state", "form", "scan"]


def expect_error(fn, op, argument):
    with pytest.raises(RuntimeError, match=rf"{op}: (.*\W)?{argument}"):
        fn()


BAD = [
    ("k_rank4", dict(k=lambda a: a["k"][:, :, 0]), "k"),
    ("v_rank_differs", dict(v=lambda a: a["v"][:, :, :2]), "v"),
    ("beta_rank_differs", dict(beta=lambda a: a["beta"][:, :, :1]), "beta"),
    ("beta_no_rank_dim", dict(beta=lambda a: a["beta"][:, :, 0]), "beta"),
    ("g_with_rank_dim", dict(g=lambda a: a["beta"]), "g"),
    ("k_time", dict(k=lambda a: a["k"][:, :-1]), "k"),
    ("q_rank5", dict(q=lambda a: a["k"]), "q"),
    ("k_heads", dict(k=lambda a: a["k"][:, :, :, :1]), "k"),
    ("k_dtype_differs", dict(k=lambda a: a["k"].double()), "q, k, v must share one dtype"),
    ("initial_state_shape", dict(initial_state=lambda a: a["initial_state"][..., :-1]), "initial_state"),
    ("bad_form", dict(form="sequential"), "form"),
    ("bad_scan", dict(scan="tree"), "scan"),
    ("rank_too_large", dict(k=lambda a: a["k"][:, :, :1].expand(-1, -1, 65, -1, -1).contiguous(),
                            v=lambda a: a["v"][:, :, :1].expand(-1, -1, 65, -1, -1).contiguous(),
                            beta=lambda a: a["beta"][:, :, :1].expand(-1, -1, 65, -1).contiguous()), "rank"),
    ("cu_seqlens_batch_not_1", dict(cu_seqlens=torch.tensor([0, 5])), "cu_seqlens"),
]


@pytest.mark.parametrize("changes,argument", [pytest.param(c, a, id=i) for i, c, a in BAD])
def test_fwd_and_bwd_reject_bad_argument(changes, argument):
    args = valid_args()
    for name, value in changes.items():
        args[name] = value(args) if callable(value) else value
    expect_error(lambda: FWD(*[args[n] for n in FWD_ARGS]), "flow_fwd", argument)
    grad_o = torch.randn(2, 5, 2, 4)
    bwd_args = [args[n] for n in FWD_ARGS[:7]] + [grad_o, None, 0.5, args["form"], args["scan"]]
    expect_error(lambda: BWD(*bwd_args), "flow_bwd", argument)


def test_bwd_rejects_bad_gradient():
    args = valid_args()
    base = [args[n] for n in FWD_ARGS[:7]]
    expect_error(lambda: BWD(*base, torch.randn(2, 4, 2, 4), None, 0.5, "product", "sequential"), "flow_bwd", "grad_o")
    expect_error(lambda: BWD(*base, torch.randn(2, 5, 2, 4), torch.randn(2, 2, 8, 3), 0.5, "product", "sequential"),
                 "flow_bwd", "grad_final_state")


def test_transition_rejects_bad_argument():
    a = valid_args()
    expect_error(lambda: TRANSITION(a["k"], a["v"], a["beta"], a["g"], "product", 0), "flow_transition", "segment")
    expect_error(lambda: TRANSITION(a["k"], a["v"][:, :, :1], a["beta"], a["g"], "product", 4), "flow_transition", "v")
    expect_error(lambda: TRANSITION(a["k"], a["v"], a["beta"], a["g"], "rank", 4), "flow_transition", "form")


def test_public_function_rejects_bad_strings():
    a = make_flow_inputs(1, 3, 2, 1, 4, 4)
    with pytest.raises(ValueError, match="flow_delta_rule: form"):
        linflow.flow_delta_rule(a["q"], a["k"], a["v"], a["beta"], form="prod")
    with pytest.raises(ValueError, match="flow_delta_rule: scan"):
        linflow.flow_delta_rule(a["q"], a["k"], a["v"], a["beta"], scan="fast")
    with pytest.raises(RuntimeError, match=r"flow_fwd: (.*\W)?beta"):
        linflow.flow_delta_rule(a["q"], a["k"], a["v"], a["beta"][:, :, :1])


# ----------------------------------------------------------------------------------------------------------------
# fla-compatible chunk_gated_delta_product (interleaved [B, T * n, H, K] keys)

@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_fla_chunk_gated_delta_product_matches_reference(gated):
    from linflow.compat.fla import chunk_gated_delta_product
    B, T, n, H, K, V = 1, 40, 2, 2, 8, 4
    a = make_flow_inputs(B, T, n, H, K, V, dtype=torch.float64, gated=gated, initial_state=True, N=2, seed=11,
                         normalize_keys=False)
    cu = torch.tensor([0, 15, 40])
    flat = lambda x: x.reshape(B, T * n, *x.shape[3:])  # noqa: E731  (fla's interleaved layout)
    leaf = leaves(a)
    o, ht = chunk_gated_delta_product(leaf["q"], flat(leaf["k"]), flat(leaf["v"]), leaf["g"], flat(leaf["beta"]),
                                      num_householder=n, initial_state=leaf["initial_state"], output_final_state=True,
                                      use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    eo, eht = flow_ref(**a, form="product", cu_seqlens=cu, use_qk_l2norm=True)
    assert_rel_close(o, eo, 1e-10, "o")
    assert_rel_close(ht, eht, 1e-10, "final_state")
    (o.sum() + ht.sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaf.values() if x is not None)


def test_fla_chunk_gated_delta_product_rejects_bad_layout():
    from linflow.compat.fla import chunk_gated_delta_product
    a = make_flow_inputs(1, 6, 2, 1, 4, 4, seed=12)
    k = a["k"].reshape(1, 12, 1, 4)
    with pytest.raises(ValueError, match="k must have shape"):
        chunk_gated_delta_product(a["q"], k[:, :-1], a["v"].reshape(1, 12, 1, 4), a["g"], a["beta"].reshape(1, 12, 1),
                                  num_householder=2)
    with pytest.raises(ValueError, match="g must have shape"):
        chunk_gated_delta_product(a["q"], k, a["v"].reshape(1, 12, 1, 4), a["beta"].reshape(1, 12, 1),
                                  a["beta"].reshape(1, 12, 1), num_householder=2)


# ----------------------------------------------------------------------------------------------------------------
# nn.FlowDeltaNet

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("use_gate", [False, True], ids=["", "gate"])
def test_flow_deltanet_layer(form, use_gate):
    """Shapes, gradients reach every parameter, state continuation equals one full pass, varlen = separate."""
    from linflow.nn import FlowDeltaNet
    torch.manual_seed(0)
    layer = FlowDeltaNet(32, num_heads=2, rank=3, form=form, use_gate=use_gate, dtype=torch.float64)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    y, state = layer(x, use_cache=True)
    assert y.shape == x.shape and state.recurrent.shape == (2, 2, 16, 16)
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        y1, s1 = layer(x[:, :13], use_cache=True)
        y2, s2 = layer(x[:, 13:], state=s1)
        # 1e-6: the layer computes beta and g in fp32 (DeltaNet's _features), whose rounding may differ by an ulp
        # between a full pass and its pieces
        assert_rel_close(torch.cat([y1, y2], 1), y.detach(), 1e-6, "continued")
        assert_rel_close(s2.recurrent, state.recurrent, 1e-6, "state")
        packed, ps = layer(x.reshape(1, 40, 32), cu_seqlens=torch.tensor([0, 20, 40]), use_cache=True)
        assert_rel_close(packed.view(2, 20, 32), y.detach(), 1e-6, "varlen")


def test_flow_deltanet_rank_one_is_deltanet():
    from linflow.nn import DeltaNet, FlowDeltaNet
    torch.manual_seed(0)
    flow = FlowDeltaNet(32, num_heads=2, rank=1, use_gate=True, dtype=torch.float64)
    delta = DeltaNet(32, num_heads=2, use_gate=True, dtype=torch.float64)
    delta.load_state_dict(flow.state_dict())
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    assert_rel_close(flow(x)[0], delta(x)[0], 1e-12, "y")
