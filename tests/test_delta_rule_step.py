"""linflow.delta_rule_step (recurrent decode against a state cache, updated in place) against the chunked op and
the float64 recurrence in reference.py."""
import pytest
import torch

import linflow
from conftest import HAS_CUDA, STATE_DTYPE, assert_rel_close, make_inputs
from reference import delta_rule_ref

STEP = torch.ops.linflow.delta_rule_step

# state and every accumulation are fp32 (fp64 for fp64 inputs): the error is the rounding of the inputs / outputs
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def step_params(dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16)):
    """(device, dtype) pairs: fp64 / fp32 on the CPU, fp32 / bf16 / fp16 on CUDA, restricted to ``dtypes``."""
    params = [("cpu", torch.float64), ("cpu", torch.float32)]
    if HAS_CUDA:
        params += [("cuda", torch.float32), ("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return [pytest.param(d, t, id=f"{d}-{str(t)[6:]}") for d, t in params if t in dtypes]


def tokens(inputs, start, stop):
    """The [start, stop) token slice of q, k, v, beta, g (initial_state dropped)."""
    return {n: (x[:, start:stop] if x is not None else None) for n, x in inputs.items() if n != "initial_state"}


@pytest.mark.parametrize("device,dtype", step_params())
@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("tokens_per_call", [1, 3])
def test_prefill_then_decode_matches_full_sequence(device, dtype, gated, tokens_per_call):
    """Chunked prefill (final state) followed by decode steps equals running the whole sequence at once."""
    torch.manual_seed(0)
    B, H, K, V, prefill, calls = 2, 3, 64, 32, 37, 3
    T = prefill + calls * tokens_per_call
    inputs = make_inputs(B, T, H, K, V, dtype=dtype, device=device, gated=gated, initial_state=True)
    ro, rht = delta_rule_ref(**inputs)
    full_o, full_ht = linflow.delta_rule(**inputs, output_final_state=True)

    o_prefill, state = linflow.delta_rule(**tokens(inputs, 0, prefill), initial_state=inputs["initial_state"],
                                          output_final_state=True)
    assert state.dtype == STATE_DTYPE[dtype] and state.is_contiguous()
    outs = [o_prefill]
    for t in range(prefill, T, tokens_per_call):
        outs.append(linflow.delta_rule_step(**tokens(inputs, t, t + tokens_per_call), state=state))
    o = torch.cat(outs, dim=1)

    assert o.dtype == dtype and o.shape == (B, T, H, V)
    tol = TOL[dtype]
    assert_rel_close(o[:, prefill:], ro[:, prefill:], tol, "decoded o vs oracle")
    assert_rel_close(state, rht, tol, "state after decoding vs oracle")
    assert_rel_close(o[:, prefill:], full_o[:, prefill:], tol, "decoded o vs chunked op on the whole sequence")
    assert_rel_close(state, full_ht, tol, "state after decoding vs chunked final state")


@pytest.mark.parametrize("device,dtype", step_params())
@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_step_equals_chunked_op_on_same_tokens(device, dtype, gated):
    torch.manual_seed(0)
    inputs = make_inputs(3, 3, 2, 128, 128, dtype=dtype, device=device, gated=gated, initial_state=True, seed=3)
    state = inputs["initial_state"].clone()
    o = linflow.delta_rule_step(**tokens(inputs, 0, 3), state=state, scale=0.3)
    co, cht = linflow.delta_rule(**inputs, output_final_state=True, scale=0.3)
    assert_rel_close(o, co, TOL[dtype], "o")
    assert_rel_close(state, cht, TOL[dtype], "state")


@pytest.mark.parametrize("device,dtype", step_params((torch.float64, torch.float32, torch.bfloat16)))
def test_step_with_qk_l2norm(device, dtype):
    torch.manual_seed(0)
    inputs = make_inputs(2, 2, 2, 32, 16, dtype=dtype, device=device, initial_state=True, normalize_keys=False)
    state = inputs["initial_state"].clone()
    o = linflow.delta_rule_step(**tokens(inputs, 0, 2), state=state, use_qk_l2norm=True)
    ro, rht = delta_rule_ref(**inputs, use_qk_l2norm=True)
    assert_rel_close(o, ro, TOL[dtype], "o")
    assert_rel_close(state, rht, TOL[dtype], "state")


@pytest.mark.parametrize("device,dtype", step_params())
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("tokens_per_call", [1, 3])
def test_state_indices_update_only_their_cache_rows(device, dtype, index_dtype, tokens_per_call):
    """Row b uses and updates cache[state_indices[b]] (a permuted subset of a larger cache); other rows untouched."""
    torch.manual_seed(0)
    B, H, K, V, N = 3, 2, 32, 64, 7
    inputs = make_inputs(B, tokens_per_call, H, K, V, dtype=dtype, device=device, gated=True, initial_state=True,
                         N=N)
    cache = inputs["initial_state"].clone()
    before = cache.clone()
    idx = torch.tensor([5, 0, 3], dtype=index_dtype, device=device)
    ptr = cache.data_ptr()

    o = linflow.delta_rule_step(**tokens(inputs, 0, tokens_per_call), state=cache, state_indices=idx)

    assert cache.data_ptr() == ptr, "the cache must be updated in place"
    untouched = [n for n in range(N) if n not in idx.tolist()]
    torch.testing.assert_close(cache[untouched], before[untouched], rtol=0, atol=0)
    ro, rht = delta_rule_ref(**tokens(inputs, 0, tokens_per_call), initial_state=before[idx.long()])
    assert_rel_close(o, ro, TOL[dtype], "o")
    assert_rel_close(cache[idx.long()], rht, TOL[dtype], "updated cache rows")


@pytest.mark.parametrize("device,dtype", step_params())
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_negative_state_index_is_a_padding_row(device, dtype, index_dtype):
    """state_indices[b] < 0 marks a padding row: o[b] = 0 and no cache row changes; the other rows are unaffected."""
    torch.manual_seed(0)
    B, H, K, V, N = 4, 2, 32, 16, 5
    inputs = make_inputs(B, 2, H, K, V, dtype=dtype, device=device, gated=True, initial_state=True, N=N)
    cache = inputs["initial_state"].clone()
    before = cache.clone()
    idx = torch.tensor([3, -1, 0, -1], dtype=index_dtype, device=device)

    o = linflow.delta_rule_step(**tokens(inputs, 0, 2), state=cache, state_indices=idx)

    assert torch.equal(o[[1, 3]], torch.zeros_like(o[[1, 3]])), "padding rows must output zeros"
    torch.testing.assert_close(cache[[1, 2, 4]], before[[1, 2, 4]], rtol=0, atol=0)
    live = [0, 2]
    ro, rht = delta_rule_ref(**{n: x[live] for n, x in tokens(inputs, 0, 2).items()}, initial_state=before[[3, 0]])
    assert_rel_close(o[live], ro, TOL[dtype], "o of the live rows")
    assert_rel_close(cache[[3, 0]], rht, TOL[dtype], "updated cache rows")


@pytest.mark.parametrize("device,dtype", step_params((torch.float32,)))
def test_state_indices_identity_equals_no_indices(device, dtype):
    torch.manual_seed(0)
    inputs = make_inputs(4, 1, 2, 16, 16, dtype=dtype, device=device, gated=True, initial_state=True)
    s1, s2 = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    o1 = linflow.delta_rule_step(**tokens(inputs, 0, 1), state=s1)
    o2 = linflow.delta_rule_step(**tokens(inputs, 0, 1), state=s2,
                                 state_indices=torch.arange(4, dtype=torch.int32, device=device))
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype", step_params((torch.float64, torch.float32, torch.bfloat16)))
def test_opcheck_delta_rule_step(device, dtype):
    """opcheck on the mutating op (schema: state is Tensor(a!))."""
    torch.manual_seed(0)
    inputs = make_inputs(3, 2, 2, 16, 32, dtype=dtype, device=device, gated=True, initial_state=True, N=5)
    idx = torch.tensor([4, 1, 2], dtype=torch.int64, device=device)
    args = [inputs[n] for n in ("q", "k", "v", "beta", "g")]
    torch.library.opcheck(STEP, (*args, inputs["initial_state"].clone(), idx, 0.25))
    torch.library.opcheck(STEP, (*args[:4], None, inputs["initial_state"][:3].clone(), None, 0.25))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_step_replays_in_cuda_graph_with_new_inputs(dtype):
    """Capture one decode step in a CUDA graph; replaying after copying new inputs into the static buffers gives the
    eager result each time (no host sync, no value-dependent allocation inside the op)."""
    torch.manual_seed(0)
    B, H, K, V, N = 4, 2, 128, 64, 9

    def fresh(seed):
        x = tokens(make_inputs(B, 1, H, K, V, dtype=dtype, device="cuda", gated=True, seed=seed), 0, 1)
        x["state_indices"] = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:B].to("cuda")
        return x

    static = fresh(0)
    cache = make_inputs(1, 1, H, K, V, dtype=dtype, device="cuda", initial_state=True, N=N, seed=100)["initial_state"]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, on a scratch cache
        for _ in range(2):
            linflow.delta_rule_step(**static, state=cache.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    snapshot = cache.clone()
    with torch.cuda.graph(graph):
        static_o = linflow.delta_rule_step(**static, state=cache)
    cache.copy_(snapshot)  # capture does not run the kernels, but do not rely on it

    for seed in (1, 2, 3):
        new = fresh(seed)
        expected_cache = cache.clone()
        expected_o = linflow.delta_rule_step(**new, state=expected_cache)
        for name, x in new.items():
            static[name].copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_o, expected_o)  # same kernels: equal up to the library's algorithm choice
        torch.testing.assert_close(cache, expected_cache)
