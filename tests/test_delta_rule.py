"""linflow.delta_rule (chunked delta rule / Gated DeltaNet) against the float64 recurrence in reference.py.

Tolerances (relative Frobenius error vs the fp64 oracle run on the *same rounded inputs*):
  * float64 (CPU): 1e-10.  float32: 2e-5 on CPU (measured <= 2e-6 over the cases below), 5e-3 on CUDA (room for
    TF32 tensor-core kernels).
  * bfloat16 / float16 (STYLE.md): our error must be <= 2x the error of the same math done in PyTorch at that
    precision, with a floor of two units of roundoff (2^-7 bf16, 2^-10 fp16; four for gradients). "The same math in PyTorch" is the
    reference recurrence with every op run in the low-precision dtype (state included), forward and autograd
    backward; it is measured per case, per output and per gradient, on the same inputs and cotangents. That
    baseline is 4e-3 .. 2.7e-2 in bf16 (larger for long ungated sequences, whose state never forgets), so the
    tolerance is also capped at 2e-2 for values and 4e-2 for gradients in bf16 (1/8 of that in fp16, 3 more
    mantissa bits). For scale: a kernel that keeps the state in fp32 and rounds only its outputs is at ~1.7e-3
    (bf16) / ~2.1e-4 (fp16).
"""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import linflow
from conftest import (CAP, HAS_CUDA, STATE_DTYPE, TOL, assert_rel_close, cotangents, high_precision_params, leaves,
                      low_precision_params, low_precision_tol, make_inputs, rel_err, values_and_grads)
from reference import delta_rule_ref, l2norm_ref

FWD, BWD = torch.ops.linflow.delta_rule_fwd, torch.ops.linflow.delta_rule_bwd

class Case(NamedTuple):
    T: int
    K: int
    V: int
    gated: bool = True
    h0: bool = False  # initial_state given
    final: bool = True  # output_final_state (with a random cotangent on it)
    chunk: int = 64
    l2: bool = False  # use_qk_l2norm (keys otherwise L2-normalised by the test)
    scale: float | None = None
    B: int = 2
    H: int = 2

    def __str__(self):
        flags = [f"T{self.T}", f"K{self.K}", f"V{self.V}", "gated" if self.gated else "ungated",
                 "h0" if self.h0 else "noh0", "ht" if self.final else "noht", f"C{self.chunk}"]
        return "-".join(flags + (["l2"] if self.l2 else []) + ([f"s{self.scale}"] if self.scale else []))


# A covering set, not the cartesian product: every T in {1, 63, 64, 65, 300}, every (K, V) shape, gated / ungated,
# with / without initial and final state, chunk sizes 16 / 32 / 64, use_qk_l2norm, an explicit scale.
CASES = [
    Case(T=1, K=16, V=16, gated=True, h0=True),
    Case(T=1, K=128, V=32, gated=False, final=False, chunk=16),
    Case(T=63, K=64, V=64, gated=False),
    Case(T=63, K=256, V=256, gated=True, h0=True, chunk=16, B=1),
    Case(T=64, K=128, V=128, gated=True, l2=True),
    Case(T=64, K=16, V=16, gated=False, h0=True, chunk=16),
    Case(T=65, K=64, V=128, gated=True, h0=True, chunk=16),
    Case(T=65, K=256, V=256, gated=False, h0=True, final=False, B=1),
    Case(T=65, K=128, V=128, gated=False, h0=True, l2=True, scale=0.37),
    Case(T=300, K=128, V=32, gated=False, h0=True),
    Case(T=300, K=64, V=64, gated=True, final=False, chunk=32),
    Case(T=300, K=16, V=16, gated=True, h0=True, chunk=16, l2=True),
]
# the subset the CPU also runs in bf16 / fp16 (the CUDA device runs all of them)
CPU_LOW_PRECISION_CASES = [CASES[0], CASES[6], CASES[9]]
# Many (sequence, head) pairs: the CUDA state passes then use their wide blocks (4 and 8 warps, one 16-column
# slice a warp; V = 96 leaves a partial slice); the cases above, with few pairs, run them one warp a block.
WIDE_CASES = [
    Case(T=130, K=128, V=128, gated=True, h0=True, B=4, H=32),
    Case(T=70, K=64, V=96, gated=False, B=8, H=16),
]


def run_op(case: Case, **kw):
    """linflow.delta_rule with the case's options, as a function of its tensor inputs."""
    def fn(q, k, v, beta, g, initial_state):
        return linflow.delta_rule(q, k, v, beta, g, scale=case.scale, initial_state=initial_state,
                                  output_final_state=case.final, use_qk_l2norm=case.l2, chunk_size=case.chunk, **kw)
    return fn


def run_ref(case: Case, dtype=torch.float64):
    def fn(q, k, v, beta, g, initial_state):
        o, ht = delta_rule_ref(q, k, v, beta, g, scale=case.scale, initial_state=initial_state,
                               use_qk_l2norm=case.l2, dtype=dtype)
        return o, (ht if case.final else None)
    return fn


def case_inputs(case: Case, dtype, device, seed=0):
    inputs = make_inputs(case.B, case.T, case.H, case.K, case.V, dtype=dtype, device=device, gated=case.gated,
                         initial_state=case.h0, seed=seed, normalize_keys=not case.l2)
    do, dht = cotangents((case.B, case.T, case.H, case.V), (case.B, case.H, case.K, case.V) if case.final else None,
                         dtype=dtype, device=device, seed=seed + 1)
    return inputs, do, dht


def oracle(case: Case, inputs, do, dht):
    """fp64 recurrence on the (already rounded) inputs: values and gradients."""
    return values_and_grads(run_ref(case), leaves(inputs, torch.float64), do.double(),
                            dht.double() if dht is not None else None)




# ----------------------------------------------------------------------------------------------------------------
# values and gradients vs the oracle

@pytest.mark.parametrize("device,dtype", high_precision_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_values_and_grads_match_reference(case, device, dtype):
    torch.manual_seed(0)
    inputs, do, dht = case_inputs(case, dtype, device)
    o, ht, grads = values_and_grads(run_op(case), leaves(inputs), do, dht)
    ro, rht, rgrads = oracle(case, inputs, do, dht)
    tol = TOL[(device, dtype)]

    assert o.dtype == dtype and o.shape == (case.B, case.T, case.H, case.V)
    assert_rel_close(o, ro, tol, "o")
    if case.final:
        assert ht.dtype == STATE_DTYPE[dtype] and ht.shape == (case.B, case.H, case.K, case.V)
        assert_rel_close(ht, rht, tol, "final_state")
    else:
        assert ht is None
    assert set(grads) == set(rgrads) == {n for n, x in inputs.items() if x is not None}
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_rel_close(grad, rgrads[name], tol, f"d{name}")


@pytest.mark.parametrize("case,device,dtype", low_precision_params(CASES + WIDE_CASES, CPU_LOW_PRECISION_CASES))
def test_low_precision_within_2x_pytorch_error(case, device, dtype):
    torch.manual_seed(0)
    inputs, do, dht = case_inputs(case, dtype, device)
    o, ht, grads = values_and_grads(run_op(case), leaves(inputs), do, dht)
    ro, rht, rgrads = oracle(case, inputs, do, dht)
    # the same math done by PyTorch at this precision
    bo, bht, bgrads = values_and_grads(run_ref(case, dtype=dtype), leaves(inputs), do, dht)

    def check(name, ours, base, ref, gradient=False):
        tol = low_precision_tol(rel_err(base, ref), dtype, gradient)
        assert_rel_close(ours, ref, tol, f"{name} (PyTorch {str(dtype)[6:]} error {rel_err(base, ref):.2e})")

    assert o.dtype == dtype
    check("o", o, bo, ro)
    if case.final:
        check("final_state", ht, bht, rht)
    for name in rgrads:
        check(f"d{name}", grads[name], bgrads[name], rgrads[name], gradient=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_fp32_gates_with_low_precision_inputs(device, dtype):
    """beta and g may come in float32 while q, k, v are bf16 / fp16 (the usual mixed-precision layer).
    Tolerances: the caps of the low-precision rule (bf16 2e-2 values / 4e-2 gradients, fp16 1/8 of that)."""
    torch.manual_seed(0)
    case = Case(T=130, K=128, V=128, gated=True, h0=True)
    inputs, do, dht = case_inputs(case, dtype, device)
    gates = make_inputs(case.B, case.T, case.H, case.K, case.V, dtype=torch.float32, device=device, gated=True)
    inputs["beta"], inputs["g"] = gates["beta"], gates["g"]
    o, ht, grads = values_and_grads(run_op(case), leaves(inputs), do, dht)
    ro, rht, rgrads = oracle(case, inputs, do, dht)
    assert o.dtype == dtype and grads["beta"].dtype == grads["g"].dtype == torch.float32
    value_tol, grad_tol = CAP[dtype]
    assert_rel_close(o, ro, value_tol, "o")
    assert_rel_close(ht, rht, value_tol, "final_state")
    for name in rgrads:
        assert_rel_close(grads[name], rgrads[name], grad_tol, f"d{name}")


@pytest.mark.parametrize("device,dtype", high_precision_params())
def test_parallel_scan_equals_sequential(device, dtype):
    """scan="parallel" (prefix scan of the chunks' affine maps) equals the chunk loop, values and gradients."""
    inputs = make_inputs(2, 200, 2, 32, 48, dtype=dtype, device=device, gated=True, initial_state=True)
    do, dht = cotangents((2, 200, 2, 48), (2, 2, 32, 48), dtype=dtype, device=device)
    runs = [values_and_grads(lambda **x: linflow.delta_rule(**x, output_final_state=True, use_qk_l2norm=True,
                                                             scan=scan), leaves(inputs), do, dht)
            for scan in ("sequential", "parallel")]
    (so, sht, sgrads), (po, pht, pgrads) = runs
    ro, rht, rgrads = values_and_grads(lambda **x: delta_rule_ref(**{n: t.double() for n, t in x.items()},
                                                                  use_qk_l2norm=True),
                                       leaves(inputs), do.double(), dht.double())
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    ref_tol = TOL[(device, dtype)]
    assert_rel_close(po, so, tol, "o")
    assert_rel_close(pht, sht, tol, "final_state")
    assert_rel_close(po, ro, ref_tol, "o vs reference")
    assert_rel_close(pht, rht, ref_tol, "final_state vs reference")
    for name in sgrads:
        assert_rel_close(pgrads[name], sgrads[name], tol, f"d{name}")
        assert_rel_close(pgrads[name], rgrads[name], ref_tol, f"d{name} vs reference")


def test_scan_choice_is_checked():
    inputs = make_inputs(1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="scan"):
        linflow.delta_rule(**inputs, scan="tree")
    with pytest.raises(ValueError, match="chunk_size"):
        linflow.delta_rule(**inputs, scan="parallel", chunk_size=32)


def test_chunk_size_does_not_change_result():
    torch.manual_seed(0)
    inputs = make_inputs(2, 100, 2, 32, 48, dtype=torch.float64, gated=True, initial_state=True)
    results = [linflow.delta_rule(**inputs, output_final_state=True, chunk_size=c) for c in (16, 32, 64)]
    for o, ht in results[1:]:
        assert_rel_close(o, results[0][0], 1e-12, "o")
        assert_rel_close(ht, results[0][1], 1e-12, "final_state")


def test_empty_sequence_returns_initial_state(device):
    torch.manual_seed(0)
    inputs = make_inputs(2, 0, 2, 16, 8, device=device, gated=True, initial_state=True)
    o, ht = linflow.delta_rule(**inputs, output_final_state=True)
    assert o.shape == (2, 0, 2, 8)
    torch.testing.assert_close(ht, inputs["initial_state"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# variable length

def varlen_params():
    params = [("cpu", torch.float64), ("cpu", torch.float32)]
    if HAS_CUDA:
        params += [("cuda", torch.float32), ("cuda", torch.bfloat16)]
    return [pytest.param(d, t, id=f"{d}-{str(t)[6:]}") for d, t in params]


# run alone vs packed: the same math, so only rounding differs
SAME_MATH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def packed_inputs(lengths, H, K, V, dtype, device, seed=0):
    T = sum(lengths)
    inputs = make_inputs(1, T, H, K, V, dtype=dtype, device=device, gated=True, initial_state=True,
                         N=len(lengths), seed=seed)
    do, dht = cotangents((1, T, H, V), (len(lengths), H, K, V), dtype=dtype, device=device, seed=seed + 1)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return inputs, do, dht, offsets


def check_packed_equals_separate(lengths, offsets, inputs, do, dht, packed, tol):
    o, ht, grads = packed
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        seq = {name: (None if x is None else x[n : n + 1] if name == "initial_state" else x[:, bos:eos])
               for name, x in inputs.items()}
        so, sht, sgrads = values_and_grads(
            lambda **kw: linflow.delta_rule(**kw, output_final_state=True), leaves(seq), do[:, bos:eos],
            dht[n : n + 1])
        where = f"sequence {n} (length {eos - bos})"
        if eos > bos:
            assert_rel_close(o[:, bos:eos], so, tol, f"o, {where}")
        assert_rel_close(ht[n : n + 1], sht, tol, f"final_state, {where}")
        for name, grad in sgrads.items():
            packed_grad = grads[name][n : n + 1] if name == "initial_state" else grads[name][:, bos:eos]
            if packed_grad.numel():
                assert_rel_close(packed_grad, grad, tol, f"d{name}, {where}")


@pytest.mark.parametrize("device,dtype", varlen_params())
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_varlen_equals_separate_runs(device, dtype, index_dtype):
    torch.manual_seed(0)
    lengths = [1, 63, 64, 65, 130]
    inputs, do, dht, offsets = packed_inputs(lengths, H=2, K=64, V=32, dtype=dtype, device=device)
    cu_seqlens = torch.tensor(offsets, dtype=index_dtype, device=device)
    packed = values_and_grads(lambda **kw: linflow.delta_rule(**kw, output_final_state=True, cu_seqlens=cu_seqlens),
                              leaves(inputs), do, dht)
    assert packed[1].shape == (len(lengths), 2, 64, 32)
    check_packed_equals_separate(lengths, offsets, inputs, do, dht, packed, SAME_MATH_TOL[dtype])

    if dtype in (torch.float64, torch.float32):  # and the packed run against the oracle
        ro, rht, rgrads = values_and_grads(lambda **kw: delta_rule_ref(**kw, cu_seqlens=cu_seqlens.cpu()),
                                           leaves(inputs, torch.float64), do.double(), dht.double())
        tol = TOL[(device, dtype)]
        assert_rel_close(packed[0], ro, tol, "o")
        assert_rel_close(packed[1], rht, tol, "final_state")
        for name in rgrads:
            assert_rel_close(packed[2][name], rgrads[name], tol, f"d{name}")


@pytest.mark.parametrize("device,dtype", varlen_params())
def test_varlen_empty_sequence_passes_state_through(device, dtype):
    """A length-0 sequence: its final state is its initial state, and d(initial_state) = d(final_state)."""
    torch.manual_seed(0)
    lengths = [3, 0, 70, 0]
    inputs, do, dht, offsets = packed_inputs(lengths, H=2, K=32, V=16, dtype=dtype, device=device)
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    packed = values_and_grads(lambda **kw: linflow.delta_rule(**kw, output_final_state=True, cu_seqlens=cu_seqlens),
                              leaves(inputs), do, dht)
    for n in (1, 3):
        torch.testing.assert_close(packed[1][n], inputs["initial_state"][n], rtol=0, atol=0)
        torch.testing.assert_close(packed[2]["initial_state"][n], dht[n], rtol=0, atol=0)
    check_packed_equals_separate(lengths, offsets, inputs, do, dht, packed, SAME_MATH_TOL[dtype])


# ----------------------------------------------------------------------------------------------------------------
# layouts, autograd, torch.library, torch.compile

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_non_contiguous_inputs_give_same_result(device, dtype):
    torch.manual_seed(0)
    B, T, H, K, V = 2, 70, 2, 32, 16
    inputs = make_inputs(B, T, H, K, V, dtype=dtype, device=device, gated=True, initial_state=True)
    do, dht = cotangents((B, T, H, V), (B, H, K, V), dtype=dtype, device=device)

    def strided(x, kind):  # same values, a non-contiguous view
        if kind == "slice_last":
            big = torch.cat([x, torch.full_like(x, float("nan"))], dim=-1)
            return big[..., : x.shape[-1]]
        if kind == "transpose_1_2":
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        if kind == "transpose_0_1":
            return x.transpose(0, 1).contiguous().transpose(0, 1)
        if kind == "transpose_last2":
            return x.transpose(-1, -2).contiguous().transpose(-1, -2)
        raise ValueError(kind)

    kinds = dict(q="slice_last", k="transpose_1_2", v="transpose_0_1", beta="transpose_1_2", g="transpose_0_1",
                 initial_state="transpose_last2")
    views = {name: strided(x, kinds[name]) for name, x in inputs.items()}
    assert not any(x.is_contiguous() for x in views.values())

    def fn(**kw):
        return linflow.delta_rule(**kw, output_final_state=True)

    # leaves are the views themselves, so the grads flow into strided tensors
    views = {n: x.detach().requires_grad_() for n, x in views.items()}
    o, ht, grads = values_and_grads(fn, views, do.transpose(1, 2).contiguous().transpose(1, 2), dht)
    eo, eht, egrads = values_and_grads(fn, leaves(inputs), do, dht)
    assert_rel_close(o, eo, 1e-6, "o")
    assert_rel_close(ht, eht, 1e-6, "final_state")
    for name in egrads:
        assert_rel_close(grads[name], egrads[name], 1e-6, f"d{name}")


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("use_qk_l2norm", [False, True], ids=["", "l2"])
def test_gradcheck_fp64(gated, use_qk_l2norm):
    torch.manual_seed(0)
    # T = 19 with chunk 16: two chunks, the second partial
    inputs = make_inputs(1, 19, 2, 4, 3, dtype=torch.float64, gated=gated, initial_state=True,
                         normalize_keys=not use_qk_l2norm)
    names = [n for n, x in inputs.items() if x is not None]

    def fn(*args):
        kw = dict(zip(names, args))
        return linflow.delta_rule(**kw, output_final_state=True, use_qk_l2norm=use_qk_l2norm, chunk_size=16)

    args = [inputs[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_fp64_varlen():
    torch.manual_seed(0)
    inputs = make_inputs(1, 23, 1, 4, 3, dtype=torch.float64, gated=True, initial_state=True, N=3)
    cu_seqlens = torch.tensor([0, 5, 5, 23], dtype=torch.int64)
    names = list(inputs)

    def fn(*args):
        return linflow.delta_rule(*args[:5], initial_state=args[5], output_final_state=True, cu_seqlens=cu_seqlens,
                                  chunk_size=16)

    args = [inputs[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(fn, args)


def opcheck_params():
    params = [("cpu", torch.float64), ("cpu", torch.float32)]
    if HAS_CUDA:
        params += [("cuda", torch.float32), ("cuda", torch.bfloat16)]
    return [pytest.param(d, t, id=f"{d}-{str(t)[6:]}") for d, t in params]


@pytest.mark.parametrize("device,dtype", opcheck_params())
@pytest.mark.parametrize("variant", ["gated-h0-ht", "ungated", "varlen-gated-h0-ht"])
def test_opcheck_delta_rule_fwd(device, dtype, variant):
    torch.manual_seed(0)
    varlen = variant.startswith("varlen")
    gated, h0 = "-gated" in f"-{variant}", "h0" in variant
    inputs = make_inputs(1 if varlen else 2, 70, 2, 16, 32, dtype=dtype, device=device, gated=gated,
                         initial_state=h0, N=3 if varlen else None)
    cu = torch.tensor([0, 10, 10, 70], dtype=torch.int32, device=device) if varlen else None
    args = [inputs[n] for n in ("q", "k", "v", "beta", "g", "initial_state")]
    args = [x.requires_grad_() if x is not None else None for x in args]
    torch.library.opcheck(FWD, (*args, cu, 0.25, "ht" in variant, 16 if dtype == torch.float64 else 64))


@pytest.mark.parametrize("device,dtype", opcheck_params())
@pytest.mark.parametrize("variant", ["gated-h0-ht", "ungated", "varlen-gated-h0-ht"])
def test_opcheck_delta_rule_bwd(device, dtype, variant):
    torch.manual_seed(0)
    varlen = variant.startswith("varlen")
    gated, h0, ht = "-gated" in f"-{variant}", "h0" in variant, "ht" in variant
    B, N = (1, 3) if varlen else (2, 2)
    inputs = make_inputs(B, 70, 2, 16, 32, dtype=dtype, device=device, gated=gated, initial_state=h0, N=N)
    do, dht = cotangents((B, 70, 2, 32), (N, 2, 16, 32) if ht else None, dtype=dtype, device=device)
    cu = torch.tensor([0, 10, 10, 70], dtype=torch.int64, device=device) if varlen else None
    args = [inputs[n] for n in ("q", "k", "v", "beta", "g", "initial_state")]
    torch.library.opcheck(BWD, (*args, cu, do, dht, 0.25, 64))


@pytest.mark.slow
def test_compile_fullgraph_forward_backward():
    torch.manual_seed(0)
    torch._dynamo.reset()
    inputs = make_inputs(2, 40, 2, 16, 16, dtype=torch.float32, gated=True, initial_state=True,
                         normalize_keys=False)
    do, dht = cotangents((2, 40, 2, 16), (2, 2, 16, 16), dtype=torch.float32, device="cpu")

    def layer(q, k, v, beta, g, initial_state):
        o, ht = linflow.delta_rule(q, k, v, beta.sigmoid(), F.logsigmoid(g), initial_state=initial_state,
                                   output_final_state=True, use_qk_l2norm=True, chunk_size=16)
        return o * 2, ht

    compiled = torch.compile(layer, fullgraph=True)
    o, ht, grads = values_and_grads(compiled, leaves(inputs), do, dht)
    eo, eht, egrads = values_and_grads(layer, leaves(inputs), do, dht)
    assert_rel_close(o, eo, 1e-5, "o")
    assert_rel_close(ht, eht, 1e-5, "final_state")
    for name in egrads:
        assert_rel_close(grads[name], egrads[name], 1e-5, f"d{name}")


# ----------------------------------------------------------------------------------------------------------------
# long sequences

def long_sequence_inputs(B, T, H, K, V, dtype, device, seed=0):
    """Stress inputs: L2-normed keys, beta in (0, 2), gates from logsigmoid(3 N(0,1)) with ~1% near-resets (-30)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, generator=gen)
    q = torch.randn(B, T, H, K, **kw).to(dtype)
    k = l2norm_ref(torch.randn(B, T, H, K, **kw)).to(dtype)
    v = torch.randn(B, T, H, V, **kw).to(dtype)
    beta = (2 * torch.rand(B, T, H, **kw)).to(dtype)
    g = F.logsigmoid(3 * torch.randn(B, T, H, **kw))
    g = torch.where(torch.rand(B, T, H, **kw) < 0.01, torch.full_like(g, -30.0), g).to(dtype)
    h0 = torch.randn(B, H, K, V, **kw)
    return dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=h0)


def long_sequence_params():
    params = [pytest.param("cpu", 1, 65536, 1, 16, 16, torch.float32, id="cpu-B1-T65536-H1-K16-fp32")]
    if HAS_CUDA:
        params += [pytest.param("cuda", 2, 65536, 4, 128, 128, torch.bfloat16, id="cuda-B2-T65536-H4-K128-bf16"),
                   pytest.param("cuda", 1, 65536 + 17, 2, 64, 64, torch.float16, id="cuda-B1-T65553-H2-K64-fp16")]
    return params


@pytest.mark.parametrize("device,B,T,H,K,V,dtype", long_sequence_params())
def test_long_sequence_stays_finite(device, B, T, H, K, V, dtype):
    torch.manual_seed(0)
    inputs = long_sequence_inputs(B, T, H, K, V, dtype, device)
    do, dht = cotangents((B, T, H, V), (B, H, K, V), dtype=dtype, device=device)
    o, ht, grads = values_and_grads(lambda **kw: linflow.delta_rule(**kw, output_final_state=True),
                                    leaves(inputs), do, dht)
    assert torch.isfinite(o).all(), f"{(~torch.isfinite(o)).sum().item()} non-finite outputs"
    assert torch.isfinite(ht).all()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"d{name}: {(~torch.isfinite(grad)).sum().item()} non-finite"
    # the tail only depends on the last tokens (near-resets and a contractive transition): check it
    tail = 200
    tail_inputs = {n: (x[:, -tail:] if n != "initial_state" else None) for n, x in inputs.items()}
    _, ref_ht = delta_rule_ref(**tail_inputs)
    s = (inputs["g"][:, -tail:].double().sum(1))  # log of the total decay of the dropped prefix, [B, H]
    assert (s < -40).all(), "test setup: the tail must forget the prefix"
    assert_rel_close(ht, ref_ht, 1e-2 if dtype != torch.float32 else 1e-4, "final_state vs last 200 tokens")


def check_segments_cut_by_gates(B, T, H, K, V, dtype, device, starts, length, tol):
    """Gates of -30 at ``starts`` cut the state (exp(-30) ~ 1e-13 of it survives), so the ``length`` tokens from each
    start depend only on themselves: check them against the fp64 oracle and against the op run on the segment alone,
    for the dense op and for the same data packed as sequences that begin at the cuts. Inputs are generated in
    place, in slabs, so that the CUDA version can be as large as the device allows."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, K, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype, generator=gen)
    k = torch.empty(B, T, H, K, device=device, dtype=dtype)
    slab = 2**18
    for s in range(0, T, slab):  # L2-normalise without a full-size fp32 temporary
        e = min(s + slab, T)
        k[:, s:e] = l2norm_ref(torch.randn(B, e - s, H, K, device=device, generator=gen)).to(dtype)
    beta = torch.rand(B, T, H, device=device, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, device=device, generator=gen))
    for s in starts:
        g[:, s] = -30.0

    def segment(s):
        return dict(q=q[:, s : s + length], k=k[:, s : s + length], v=v[:, s : s + length],
                    beta=beta[:, s : s + length], g=g[:, s : s + length])

    def check(o):
        assert not torch.isnan(o).any(), f"{torch.isnan(o).sum().item()} NaN outputs"
        for s in starts:
            ro, _ = delta_rule_ref(**segment(s))
            alone, _ = linflow.delta_rule(**segment(s))
            assert_rel_close(o[:, s : s + length], ro, tol, f"o[{s}:{s + length}] vs oracle")
            assert_rel_close(o[:, s : s + length], alone, tol, f"o[{s}:{s + length}] vs the segment alone")

    o, _ = linflow.delta_rule(q, k, v, beta, g)
    check(o)
    del o
    if B == 1:
        bounds = sorted(set(starts) | {0, T})
        cu_seqlens = torch.tensor(bounds, dtype=torch.int64, device=device)
        o, ht = linflow.delta_rule(q, k, v, beta, g, cu_seqlens=cu_seqlens, output_final_state=True)
        check(o)
        _, rht = delta_rule_ref(**segment(bounds[-2]))
        assert_rel_close(ht[-1:], rht, tol, "final state of the last packed sequence")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_segments_cut_by_gates_depend_only_on_themselves(device, dtype):
    """The small version of test_more_than_2_pow_31_elements (same helper), on every device."""
    torch.manual_seed(0)
    T, length = 3000, 100
    check_segments_cut_by_gates(1, T, 2, 32, 16, dtype, device, starts=[0, 1029, 2048 - 64, T - length],
                                length=length, tol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.cuda
@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """B*T*H*K > 2^31 elements: 64-bit offsets everywhere. Forward only, bf16, ~40 GB at the peak (q, k, v, o and
    the kernels' workspaces are 4.3 GB each, the per-chunk states 8.6 GB). The last segment checked lies entirely
    past element 2^31 of q, k, v and o, and past element 2^32 of the per-chunk state workspace."""
    torch.manual_seed(0)
    B, T, H, K, V, length = 1, 2**21 + 237, 8, 128, 128, 100
    assert B * T * H * K > 2**31 and (T - length) * H * K > 2**31
    failure = None
    try:
        check_segments_cut_by_gates(B, T, H, K, V, torch.bfloat16, "cuda",
                                    starts=[0, 2**20 + 5, 2**21 - 64, T - length], length=length, tol=1e-2)
    except Exception as e:  # report without keeping the helper's frame (and its ~40 GB) alive in the traceback
        failure = f"{type(e).__name__}: {e}"
    torch.cuda.empty_cache()
    if failure:
        pytest.fail(failure)
