"""Every bad input to the delta rule ops raises a RuntimeError whose message names the op and the argument
(csrc/common/checks.h, csrc/delta_rule/chunk_aten.cpp, csrc/delta_rule/step_aten.cpp)."""
import pytest
import torch

import linflow
from conftest import HAS_CUDA

FWD, BWD, STEP = torch.ops.linflow.delta_rule_fwd, torch.ops.linflow.delta_rule_bwd, torch.ops.linflow.delta_rule_step
B, T, H, K, V = 2, 5, 3, 8, 4


# (device, dtype of q, k, v): on CUDA also bf16, which takes the tensor-core kernel path
PLACES = [("cpu", torch.float32)] + ([("cuda", torch.float32), ("cuda", torch.bfloat16)] if HAS_CUDA else [])


@pytest.fixture(params=PLACES, ids=[f"{d}-{str(t)[6:]}" for d, t in PLACES])
def place(request):
    return request.param


def valid_fwd_args(place, varlen=False, N=None):
    """Arguments of delta_rule_fwd (by schema name) that pass every check."""
    device, dtype = place
    torch.manual_seed(0)
    b = 1 if varlen else B
    n = N or (3 if varlen else B)
    f = dict(device=device)
    return dict(
        q=torch.randn(b, T, H, K, dtype=dtype, **f), k=torch.randn(b, T, H, K, dtype=dtype, **f),
        v=torch.randn(b, T, H, V, dtype=dtype, **f), beta=torch.rand(b, T, H, **f), g=-torch.rand(b, T, H, **f),
        initial_state=torch.randn(n, H, K, V, **f),
        cu_seqlens=torch.tensor([0, 2, 2, T], dtype=torch.int32, device=device) if varlen else None,
        scale=0.5, output_final_state=True, chunk_size=64)


FWD_ARGS = ["q", "k", "v", "beta", "g", "initial_state", "cu_seqlens", "scale", "output_final_state", "chunk_size"]
BWD_ARGS = ["q", "k", "v", "beta", "g", "initial_state", "cu_seqlens", "grad_o", "grad_final_state", "scale",
            "chunk_size"]
STEP_ARGS = ["q", "k", "v", "beta", "g", "state", "state_indices", "scale"]


def call(op, names, args):
    return op(*[args[n] for n in names])


def expect_error(fn, op: str, argument: str):
    """RuntimeError whose message starts with '<op>: ' and then names ``argument`` (a regex)."""
    with pytest.raises(RuntimeError, match=rf"{op}: (.*\W)?{argument}"):
        fn()


def replace(**changes):
    """A mutation of valid args: each value is a function of the args dict (or a constant)."""
    def mutate(args):
        for name, value in changes.items():
            args[name] = value(args) if callable(value) else value
        return args
    return mutate


# (id, mutation, argument named in the message)
SHAPE_AND_DTYPE_CASES = [
    # wrong rank
    ("q_rank3", replace(q=lambda a: a["q"][0]), "q"),
    ("k_rank5", replace(k=lambda a: a["k"][None]), "k"),
    ("v_rank3", replace(v=lambda a: a["v"][0]), "v"),
    ("beta_rank4", replace(beta=lambda a: a["beta"][..., None]), "beta"),
    ("g_rank2", replace(g=lambda a: a["g"][0]), "g"),
    # B / T / H (and K) mismatch against q
    ("k_batch", replace(k=lambda a: a["k"][:1]), "k"),
    ("k_time", replace(k=lambda a: a["k"][:, :-1]), "k"),
    ("k_heads", replace(k=lambda a: a["k"][:, :, :-1]), "k"),
    ("k_head_dim", replace(k=lambda a: a["k"][..., :-1]), "k"),
    ("v_batch", replace(v=lambda a: a["v"][:1]), "v"),
    ("v_time", replace(v=lambda a: a["v"][:, 1:]), "v"),
    ("v_heads", replace(v=lambda a: a["v"][:, :, 1:]), "v"),
    ("beta_batch", replace(beta=lambda a: a["beta"][:1]), "beta"),
    ("beta_time", replace(beta=lambda a: a["beta"][:, :-1]), "beta"),
    ("beta_heads", replace(beta=lambda a: a["beta"][:, :, :-1]), "beta"),
    ("g_batch", replace(g=lambda a: a["g"][:1]), "g"),
    ("g_time", replace(g=lambda a: a["g"][:, :-1]), "g"),
    ("g_heads", replace(g=lambda a: a["g"][:, :, :-1]), "g"),
    # dtypes
    ("k_dtype_differs", replace(k=lambda a: a["k"].half()), r"q, k, v must share one dtype"),
    ("v_dtype_differs", replace(v=lambda a: a["v"].double() if a["v"].is_cpu else a["v"].half()),
     r"q, k, v must share one dtype"),
    ("q_int", replace(q=lambda a: a["q"].int()), "q"),
    ("k_int", replace(k=lambda a: a["k"].long()), "k"),
    ("v_bool", replace(v=lambda a: a["v"] > 0), "v"),
    ("beta_int", replace(beta=lambda a: a["beta"].int()), "beta"),
    ("g_int", replace(g=lambda a: a["g"].int()), "g"),
    ("q_complex", replace(q=lambda a: a["q"].to(torch.complex64)), "q"),
    # head dims
    ("head_dim_k_0", replace(q=lambda a: a["q"][..., :0], k=lambda a: a["k"][..., :0]), "head dim K"),
    ("head_dim_k_300", replace(q=lambda a: a["q"].new_ones(B, T, H, 300), k=lambda a: a["k"].new_ones(B, T, H, 300)),
     "head dim K"),
    ("head_dim_v_0", replace(v=lambda a: a["v"][..., :0]), "head dim V"),
    ("head_dim_v_300", replace(v=lambda a: a["v"].new_ones(B, T, H, 300)), "head dim V"),
    # chunk size
    ("chunk_size_0", replace(chunk_size=0), "chunk_size"),
    ("chunk_size_48", replace(chunk_size=48), "chunk_size"),
    ("chunk_size_128", replace(chunk_size=128), "chunk_size"),
    ("chunk_size_negative", replace(chunk_size=-64), "chunk_size"),
    # initial state
    ("initial_state_rank3", replace(initial_state=lambda a: a["initial_state"][0]), "initial_state"),
    ("initial_state_batch", replace(initial_state=lambda a: a["initial_state"][:1]), "initial_state"),
    ("initial_state_heads", replace(initial_state=lambda a: a["initial_state"][:, 1:]), "initial_state"),
    ("initial_state_transposed", replace(initial_state=lambda a: a["initial_state"].transpose(-1, -2)),
     "initial_state"),
    ("initial_state_int", replace(initial_state=lambda a: a["initial_state"].int()), "initial_state"),
]

CU_SEQLENS_CASES = [
    # (id, mutation, argument, reads values: CPU only)
    ("float", replace(cu_seqlens=lambda a: a["cu_seqlens"].float()), "cu_seqlens", False),
    ("2d", replace(cu_seqlens=lambda a: a["cu_seqlens"][None]), "cu_seqlens", False),
    ("0d", replace(cu_seqlens=lambda a: a["cu_seqlens"][0]), "cu_seqlens", False),
    ("single_offset", replace(cu_seqlens=lambda a: a["cu_seqlens"][:1]), "cu_seqlens", False),
    ("batch_not_1", replace(**{n: (lambda a, n=n: torch.cat([a[n], a[n]])) for n in ("q", "k", "v", "beta", "g")}),
     "cu_seqlens", False),
    ("initial_state_not_N", replace(initial_state=lambda a: a["initial_state"][:2]), "initial_state", False),
    ("not_starting_at_0", replace(cu_seqlens=lambda a: a["cu_seqlens"] + 1), r"cu_seqlens\[0\]", True),
    ("decreasing", replace(cu_seqlens=lambda a: torch.tensor([0, 3, 2, T], dtype=torch.int32)
                           .to(a["q"].device)), "cu_seqlens", True),
    ("last_below_T", replace(cu_seqlens=lambda a: a["cu_seqlens"].clamp(max=T - 1)), r"cu_seqlens\[-1\]", True),
    ("last_above_T", replace(cu_seqlens=lambda a: torch.tensor([0, 2, 2, T + 1], dtype=torch.int64)
                             .to(a["q"].device)), r"cu_seqlens\[-1\]", True),
]


@pytest.mark.parametrize("mutation,argument", [pytest.param(m, a, id=i) for i, m, a in SHAPE_AND_DTYPE_CASES])
def test_fwd_rejects_bad_argument(place, mutation, argument):
    args = mutation(valid_fwd_args(place))
    expect_error(lambda: call(FWD, FWD_ARGS, args), "delta_rule_fwd", argument)


@pytest.mark.parametrize("mutation,argument", [pytest.param(m, a, id=i) for i, m, a in SHAPE_AND_DTYPE_CASES])
def test_bwd_rejects_bad_argument(place, mutation, argument):
    args = mutation(valid_fwd_args(place))
    args["grad_o"] = torch.randn(B, T, H, V, device=place[0], dtype=place[1])
    args["grad_final_state"] = None
    expect_error(lambda: call(BWD, BWD_ARGS, args), "delta_rule_bwd", argument)


@pytest.mark.parametrize("mutation,argument,reads_values",
                         [pytest.param(m, a, r, id=i) for i, m, a, r in CU_SEQLENS_CASES])
def test_fwd_rejects_bad_cu_seqlens(place, mutation, argument, reads_values):
    if reads_values and place[0] != "cpu":
        pytest.skip("by design the values of a CUDA cu_seqlens are not checked (no host sync; checks.h)")
    args = mutation(valid_fwd_args(place, varlen=True))
    expect_error(lambda: call(FWD, FWD_ARGS, args), "delta_rule_fwd", argument)


def test_public_function_reports_op_errors():
    """linflow.delta_rule passes arguments straight to the op: the user sees the op's message."""
    args = valid_fwd_args(("cpu", torch.float32))
    with pytest.raises(RuntimeError, match=r"delta_rule_fwd: (.*\W)?chunk_size"):
        linflow.delta_rule(args["q"], args["k"], args["v"], args["beta"], chunk_size=100)
    with pytest.raises(RuntimeError, match=r"delta_rule_fwd: (.*\W)?beta"):
        linflow.delta_rule(args["q"], args["k"], args["v"], args["beta"][:, :-1])
    with pytest.raises(RuntimeError, match=r"delta_rule_step: (.*\W)?state"):
        linflow.delta_rule_step(args["q"][:, :1], args["k"][:, :1], args["v"][:, :1], args["beta"][:, :1],
                                args["initial_state"][..., :-1])


@pytest.mark.parametrize("bad", ["grad_o_shape", "grad_o_int", "grad_final_state_shape", "grad_final_state_rank"])
def test_bwd_rejects_bad_gradient(place, bad):
    args = valid_fwd_args(place)
    args["grad_o"] = torch.randn(B, T, H, V, device=place[0], dtype=place[1])
    args["grad_final_state"] = torch.randn(B, H, K, V, device=place[0])
    if bad == "grad_o_shape":
        args["grad_o"] = args["grad_o"][:, :-1]
    elif bad == "grad_o_int":
        args["grad_o"] = args["grad_o"].int()
    elif bad == "grad_final_state_shape":
        args["grad_final_state"] = args["grad_final_state"][..., :-1]
    else:
        args["grad_final_state"] = args["grad_final_state"][0]
    expect_error(lambda: call(BWD, BWD_ARGS, args), "delta_rule_bwd", bad.rsplit("_", 1)[0])


# ----------------------------------------------------------------------------------------------------------------
# delta_rule_step

def valid_step_args(place, N=6):
    a = valid_fwd_args(place)
    f = dict(device=place[0])
    return dict(q=a["q"][:, :1], k=a["k"][:, :1], v=a["v"][:, :1], beta=a["beta"][:, :1], g=a["g"][:, :1],
                state=torch.randn(N, H, K, V, **f), state_indices=torch.tensor([4, 1], dtype=torch.int32, **f),
                scale=0.5)


STEP_CASES = [
    ("q_rank3", replace(q=lambda a: a["q"][0]), "q"),
    ("k_heads", replace(k=lambda a: a["k"][:, :, 1:]), "k"),
    ("v_batch", replace(v=lambda a: a["v"][:1]), "v"),
    ("beta_time", replace(beta=lambda a: torch.cat([a["beta"], a["beta"]], 1)), "beta"),
    ("k_dtype_differs", replace(k=lambda a: a["k"].half()), r"q, k, v must share one dtype"),
    ("q_int", replace(q=lambda a: a["q"].int(), k=lambda a: a["k"].int(), v=lambda a: a["v"].int()), "q"),
    ("head_dim_k_300", replace(q=lambda a: a["q"].new_ones(B, 1, H, 300), k=lambda a: a["k"].new_ones(B, 1, H, 300),
                               state=lambda a: a["state"].new_ones(6, H, 300, V)), "head dim K"),
    ("state_not_contiguous", replace(state=lambda a: torch.randn(12, H, K, V, device=a["q"].device)[::2]),
     "state must be contiguous"),
    ("state_rank3", replace(state=lambda a: a["state"][0]), "state"),
    ("state_heads", replace(state=lambda a: a["state"][:, 1:].contiguous()), "state"),
    ("state_key_dim", replace(state=lambda a: a["state"][:, :, 1:].contiguous()), "state"),
    ("state_value_dim", replace(state=lambda a: a["state"][..., 1:].contiguous()), "state"),
    ("state_int", replace(state=lambda a: a["state"].int()), "state"),
    ("state_rows_without_indices", replace(state_indices=None), "state"),
    ("state_indices_too_long", replace(state_indices=lambda a: torch.cat([a["state_indices"]] * 2)), "state_indices"),
    ("state_indices_too_short", replace(state_indices=lambda a: a["state_indices"][:1]), "state_indices"),
    ("state_indices_2d", replace(state_indices=lambda a: a["state_indices"][None]), "state_indices"),
    ("state_indices_float", replace(state_indices=lambda a: a["state_indices"].float()), "state_indices"),
]


@pytest.mark.parametrize("mutation,argument", [pytest.param(m, a, id=i) for i, m, a in STEP_CASES])
def test_step_rejects_bad_argument(place, mutation, argument):
    args = mutation(valid_step_args(place))
    expect_error(lambda: call(STEP, STEP_ARGS, args), "delta_rule_step", argument)


def test_step_rejects_state_index_past_cache_end_cpu():
    args = valid_step_args(("cpu", torch.float32))
    args["state_indices"] = torch.tensor([6, 1], dtype=torch.int64)  # the cache has 6 rows
    expect_error(lambda: call(STEP, STEP_ARGS, args), "delta_rule_step", "state_indices")


# ----------------------------------------------------------------------------------------------------------------
# CUDA only: devices and dtypes

CUDA_FP32 = ("cuda", torch.float32)


def to_cpu(name):
    return replace(**{name: lambda a: a[name].cpu()})


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["k", "v", "beta", "g", "initial_state"])
def test_fwd_rejects_mixed_devices(name):
    args = to_cpu(name)(valid_fwd_args(CUDA_FP32))
    expect_error(lambda: call(FWD, FWD_ARGS, args), "delta_rule_fwd", rf"{name} is on cpu")


@pytest.mark.cuda
def test_fwd_rejects_cu_seqlens_on_other_device():
    args = to_cpu("cu_seqlens")(valid_fwd_args(CUDA_FP32, varlen=True))
    expect_error(lambda: call(FWD, FWD_ARGS, args), "delta_rule_fwd", "cu_seqlens is on cpu")


@pytest.mark.cuda
def test_fwd_rejects_q_on_cpu_with_rest_on_cuda():
    args = to_cpu("q")(valid_fwd_args(CUDA_FP32))
    expect_error(lambda: call(FWD, FWD_ARGS, args), "delta_rule_fwd", "k is on cuda")


@pytest.mark.cuda
def test_bwd_rejects_grad_on_other_device():
    args = valid_fwd_args(CUDA_FP32)
    args["grad_o"], args["grad_final_state"] = torch.randn(B, T, H, V), None
    expect_error(lambda: call(BWD, BWD_ARGS, args), "delta_rule_bwd", "grad_o is on cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["k", "state", "state_indices"])
def test_step_rejects_mixed_devices(name):
    args = to_cpu(name)(valid_step_args(CUDA_FP32))
    expect_error(lambda: call(STEP, STEP_ARGS, args), "delta_rule_step", rf"{name} is on cpu")


@pytest.mark.cuda
def test_float64_rejected_on_cuda():
    args = valid_fwd_args(CUDA_FP32)
    for name in ("q", "k", "v"):
        args[name] = args[name].double()
    expect_error(lambda: call(FWD, FWD_ARGS, args), "delta_rule_fwd", "q is float64 on CUDA")


# ----------------------------------------------------------------------------------------------------------------
# deltaformer (csrc/deltaformer/chunk_aten.cpp)

DF_FWD, DF_BWD = torch.ops.linflow.deltaformer_fwd, torch.ops.linflow.deltaformer_bwd
DF_FWD_ARGS = ["q", "k", "v", "beta", "w", "cu_seqlens", "scale", "chunk_size"]
DF_BWD_ARGS = ["q", "k", "v", "beta", "w", "cu_seqlens", "o", "u", "r", "lse_w", "lse_o", "grad_o", "grad_u",
               "scale", "chunk_size"]
HQ, HKV = 4, 2  # grouped-query attention: 4 query heads read 2 KV heads


def valid_deltaformer_args(place, varlen=False):
    device, dtype = place
    torch.manual_seed(0)
    b = 1 if varlen else B
    f = dict(device=device)
    return dict(
        q=torch.randn(b, T, HQ, K, dtype=dtype, **f), k=torch.randn(b, T, HKV, K, dtype=dtype, **f),
        v=torch.randn(b, T, HKV, V, dtype=dtype, **f), beta=torch.rand(b, T, HKV, **f),
        w=torch.randn(b, T, HKV, K, dtype=dtype, **f),
        cu_seqlens=torch.tensor([0, 2, 2, T], dtype=torch.int32, device=device) if varlen else None,
        scale=0.5, chunk_size=64)


def with_forward_outputs(args):
    o, u, r, lse_w, lse_o = DF_FWD(*[args[n] for n in DF_FWD_ARGS])
    args.update(o=o, u=u, r=r, lse_w=lse_w, lse_o=lse_o, grad_o=torch.randn_like(o), grad_u=torch.randn_like(u))
    return args


DELTAFORMER_CASES = [
    ("q_rank3", replace(q=lambda a: a["q"][0]), "q"),
    ("k_rank5", replace(k=lambda a: a["k"][None]), "k"),
    ("v_rank3", replace(v=lambda a: a["v"][0]), "v"),
    ("beta_rank4", replace(beta=lambda a: a["beta"][..., None]), "beta"),
    ("w_rank3", replace(w=lambda a: a["w"][0]), "w"),
    ("k_heads_not_dividing", replace(k=lambda a: a["k"].new_ones(B, T, 3, K)), r"k has 3 heads"),
    ("k_time", replace(k=lambda a: a["k"][:, :-1]), "k"),
    ("k_head_dim", replace(k=lambda a: a["k"][..., :-1]), "k"),
    ("v_heads", replace(v=lambda a: a["v"][:, :, :1]), "v"),
    ("v_time", replace(v=lambda a: a["v"][:, 1:]), "v"),
    ("beta_query_heads", replace(beta=lambda a: a["beta"].new_ones(B, T, HQ)), "beta"),
    ("beta_time", replace(beta=lambda a: a["beta"][:, :-1]), "beta"),
    ("w_query_heads", replace(w=lambda a: a["w"].new_ones(B, T, HQ, K)), "w"),
    ("w_head_dim", replace(w=lambda a: a["w"][..., :-1]), "w"),
    ("w_dtype_differs", replace(w=lambda a: a["w"].half()), r"w must have q's dtype"),
    ("k_dtype_differs", replace(k=lambda a: a["k"].half()), r"q, k, v must share one dtype"),
    ("q_int", replace(q=lambda a: a["q"].int()), "q"),
    ("beta_int", replace(beta=lambda a: a["beta"].int()), "beta"),
    ("v_bool", replace(v=lambda a: a["v"] > 0), "v"),
    ("head_dim_k_300", replace(q=lambda a: a["q"].new_ones(B, T, HQ, 300), k=lambda a: a["k"].new_ones(B, T, HKV, 300),
                               w=None), "head dim K"),
    ("head_dim_v_0", replace(v=lambda a: a["v"][..., :0]), "head dim V"),
    ("chunk_size_48", replace(chunk_size=48), "chunk_size"),
    ("chunk_size_0", replace(chunk_size=0), "chunk_size"),
]


@pytest.mark.parametrize("mutation,argument", [pytest.param(m, a, id=i) for i, m, a in DELTAFORMER_CASES])
def test_deltaformer_fwd_rejects_bad_argument(place, mutation, argument):
    args = mutation(valid_deltaformer_args(place))
    expect_error(lambda: call(DF_FWD, DF_FWD_ARGS, args), "deltaformer_fwd", argument)


@pytest.mark.parametrize("mutation,argument", [pytest.param(m, a, id=i) for i, m, a in DELTAFORMER_CASES])
def test_deltaformer_bwd_rejects_bad_argument(place, mutation, argument):
    args = mutation(with_forward_outputs(valid_deltaformer_args(place)))
    expect_error(lambda: call(DF_BWD, DF_BWD_ARGS, args), "deltaformer_bwd", argument)


@pytest.mark.parametrize("name", ["o", "u", "r", "lse_w", "lse_o", "grad_o", "grad_u"])
def test_deltaformer_bwd_rejects_bad_saved_or_gradient(place, name):
    args = with_forward_outputs(valid_deltaformer_args(place))
    args[name] = args[name][:, :-1]
    expect_error(lambda: call(DF_BWD, DF_BWD_ARGS, args), "deltaformer_bwd", name)


@pytest.mark.parametrize("mutation,argument,reads_values",
                         [pytest.param(m, a, r, id=i) for i, m, a, r in CU_SEQLENS_CASES
                          if i not in ("initial_state_not_N", "batch_not_1")]
                         + [pytest.param(replace(**{n: (lambda a, n=n: torch.cat([a[n], a[n]]))
                                                    for n in ("q", "k", "v", "beta", "w")}),
                                         "cu_seqlens", False, id="batch_not_1")])
def test_deltaformer_fwd_rejects_bad_cu_seqlens(place, mutation, argument, reads_values):
    if reads_values and place[0] != "cpu":
        pytest.skip("by design the values of a CUDA cu_seqlens are not checked (no host sync; checks.h)")
    args = mutation(valid_deltaformer_args(place, varlen=True))
    expect_error(lambda: call(DF_FWD, DF_FWD_ARGS, args), "deltaformer_fwd", argument)


def test_deltaformer_public_function_reports_op_errors():
    args = valid_deltaformer_args(("cpu", torch.float32))
    with pytest.raises(RuntimeError, match=r"deltaformer_fwd: (.*\W)?chunk_size"):
        linflow.deltaformer(args["q"], args["k"], args["v"], chunk_size=100)
    with pytest.raises(RuntimeError, match=r"deltaformer_fwd: (.*\W)?beta"):
        linflow.deltaformer(args["q"], args["k"], args["v"], args["beta"][:, :-1])


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["k", "v", "beta", "w"])
def test_deltaformer_fwd_rejects_mixed_devices(name):
    args = to_cpu(name)(valid_deltaformer_args(CUDA_FP32))
    expect_error(lambda: call(DF_FWD, DF_FWD_ARGS, args), "deltaformer_fwd", rf"{name} is on cpu")
