#!/usr/bin/env python
"""Delta rule (DeltaNet, Gated DeltaNet): linflow beside fla (the anchor) and causal softmax attention, plus decode.

    python benchmarks/bench_delta_rule.py                 # GPU, full run (bash benchmarks/gpu_check.sh runs this)
    python benchmarks/bench_delta_rule.py --quick         # fewer repetitions
    python benchmarks/bench_delta_rule.py --shapes 8x4096 --skip-fla
    python benchmarks/bench_delta_rule.py --cpu-smoke     # tiny shapes on CPU: checks this script end to end

Training rows: bf16, H=16, K=V=128, fwd and fwd+bwd, ms / TFLOP/s / GB/s as % of the ceilings measured in this
process, peak memory of fwd+bwd. fla is imported from the git-ignored folder .fla/ (never a dependency of linflow);
each of its ops is optional and a refusal becomes a note. Both sides normalise q and k the same way (--l2norm).
Decode rows: one token at B=64 against an fp32 state cache, eager and CUDA-graph replay. The tables print last.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import re
import signal
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "python"))

import harness as hz  # noqa: E402

SHAPES = {"B32-T1024": (32, 1024), "B8-T4096": (8, 4096), "B1-T65536": (1, 65536)}
VARIANTS = {"DeltaNet": False, "Gated DeltaNet": True}  # name -> gated
PASSES = ("fwd", "fwd+bwd")
GATED_SLACK = 1.15  # goal: Gated DeltaNet within 15% of DeltaNet


# --------------------------------------------------------------------------------------------- work and traffic
def delta_rule_fwd_flops(B: int, T: int, H: int, K: int, V: int, C: int = 64) -> float:
    """Chunk-form forward, ALGORITHMS.md §1, per token and head:
      6 K V        the three state products per chunk (W·S, Q·S, K^T·Vn), 2 K V FLOPs per row each;
      10 C (K+V)/2 the intra-chunk C-wide products (K K^T, Q K^T, Tm·βK: 2 C K each; Tm·βV, (QK^T∘M)·Vn: 2 C V
                   each), i.e. about 5 C (K+V);
      C^2          the unit-lower-triangular solve (C^3/3 per chunk, rounded up).
    """
    return float(B * T * H) * (6 * K * V + 10 * C * (K + V) / 2 + C * C)


def delta_rule_flops(B: int, T: int, H: int, K: int, V: int, C: int, mode: str) -> float:
    """fwd, or fwd+bwd with the backward ≈ 2.5x the forward (it recomputes the WY form and runs the transposed
    products of every forward GEMM) — ALGORITHMS.md §1."""
    fwd = delta_rule_fwd_flops(B, T, H, K, V, C)
    return fwd if mode == "fwd" else 3.5 * fwd


def delta_rule_bytes(x: "Inputs", gated: bool, mode: str) -> int:
    """Minimal HBM traffic: every input read once and every output written once, per pass.
      fwd:     read q, k, v, beta (, g); write o.
      fwd+bwd: the forward, then a backward that reads q, k, v, beta (, g), do and writes dq, dk, dv, dbeta (, dg)
               (states are recomputed, never stored: they add no minimal traffic)."""
    g = x.g if gated else None
    ins = hz.nbytes(x.q, x.k, x.v, x.beta, g)
    fwd = ins + hz.nbytes(x.do)  # o has do's shape and dtype
    if mode == "fwd":
        return fwd
    return fwd + ins + hz.nbytes(x.do) + ins  # read inputs + do, write one gradient per input


def decode_bytes(s: "DecodeSet", gated: bool) -> int:
    """One decode step: the fp32 state read and written (2 B H K V 4 bytes) + q, k, v, beta (, g) read + o written."""
    return 2 * hz.nbytes(s.state) + hz.nbytes(s.q, s.k, s.v, s.beta, s.g if gated else None) + hz.nbytes(s.v)


def sdpa_bytes(q, k, v, mode: str) -> int:
    """fwd: read q, k, v, write o; bwd: read q, k, v, o, do, write dq, dk, dv (the log-sum-exp rows are ignored)."""
    fwd = hz.nbytes(q, k, v) + hz.nbytes(q)
    return fwd if mode == "fwd" else fwd + 5 * hz.nbytes(q) + 3 * hz.nbytes(q)


# ------------------------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor  # sigmoid of a projection: (0, 1), q's dtype (fla's tests do the same)
    g: torch.Tensor  # logsigmoid: log decay <= 0, fp32
    do: torch.Tensor

    def leaves(self, gated: bool) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, self.beta] + ([self.g] if gated else [])


def make_inputs(B, T, H, K, V, *, device, dtype, prenorm: bool, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=gen, device=device, dtype=torch.float32).to(dt)  # noqa: E731
    q, k = rnd(B, T, H, K), rnd(B, T, H, K)
    if prenorm:
        q, k = F.normalize(q.float(), dim=-1).to(dtype), F.normalize(k.float(), dim=-1).to(dtype)
    v = rnd(B, T, H, V)
    beta = torch.rand(B, T, H, generator=gen, device=device).sigmoid().to(dtype)
    g = F.logsigmoid(torch.rand(B, T, H, generator=gen, device=device))
    do = rnd(B, T, H, V)
    x = Inputs(q, k, v, beta, g, do)
    for t in x.leaves(True):
        t.requires_grad_(True)
    return x


@dataclass
class DecodeSet:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor
    g: torch.Tensor
    state: torch.Tensor  # [B, H, K, V] fp32, updated in place by linflow


def make_decode_sets(n, B, H, K, V, *, device, dtype, prenorm: bool, seed: int = 1) -> list[DecodeSet]:
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n):
        rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
        q, k = rnd(B, 1, H, K), rnd(B, 1, H, K)
        if prenorm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        sets.append(DecodeSet(q.to(dtype), k.to(dtype), rnd(B, 1, H, V).to(dtype),
                              torch.rand(B, 1, H, generator=gen, device=device).sigmoid().to(dtype),
                              F.logsigmoid(torch.rand(B, 1, H, generator=gen, device=device)),
                              0.1 * rnd(B, H, K, V)))
    return sets


# ------------------------------------------------------------------------------------------------ implementations
def import_linflow():
    try:
        import linflow
        from linflow import _C_loader

        note = None if _C_loader.HAS_CUDA_KERNELS or not torch.cuda.is_available() else \
            "linflow was built without CUDA kernels (CPU-only build)"
        return linflow, note
    except Exception as exc:  # noqa: BLE001
        return None, f"import linflow failed: {hz.short_error(exc)}"


FLA_OPS = {  # name -> module holding it
    "chunk_delta_rule": "fla.ops.delta_rule",
    "chunk_gated_delta_rule": "fla.ops.gated_delta_rule",
    "fused_recurrent_delta_rule": "fla.ops.delta_rule",
    "fused_recurrent_gated_delta_rule": "fla.ops.gated_delta_rule",
}


def import_fla(root: Path) -> tuple[dict, dict, dict]:
    """Import fla's op functions from ``root``/fla, each optional. Returns (ops, errors, info).

    fla/__init__.py imports its layers and models (transformers), fla/ops/__init__.py every op family and
    fla/modules/__init__.py every module; none of that is needed here. So first the three packages are entered in
    sys.modules as bare namespaces (their __init__ files not run) and only the op modules are imported; if that
    fails, a plain ``import fla.ops...`` is tried."""
    ops, errors, info = {}, {}, {"root": str(root)}
    pkg = root / "fla"
    if not (pkg / "__init__.py").exists():
        return ops, {name: f"no fla package under {root}" for name in FLA_OPS}, info
    text = (pkg / "__init__.py").read_text()
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    info["version"] = m.group(1) if m else None
    commit = root / "COMMIT"
    info["commit"] = commit.read_text().strip() if commit.exists() else None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

    def stub(name: str, path: Path):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        mod.__file__ = str(path / "__init__.py")
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__spec__.submodule_search_locations = [str(path)]
        mod.__version__ = info["version"] or "0"
        sys.modules[name] = mod

    def load_all(mode: str):
        for name, modname in FLA_OPS.items():
            if name in ops:
                continue
            try:
                ops[name] = getattr(importlib.import_module(modname), name)
                errors.pop(name, None)
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"import ({mode}): {hz.short_error(exc)}"

    for name, sub in (("fla", pkg), ("fla.ops", pkg / "ops"), ("fla.modules", pkg / "modules")):
        if name not in sys.modules:
            stub(name, sub)
    load_all("op modules only")
    info["import"] = "op modules only"
    if not ops:  # retry the ordinary way, from a clean slate
        for name in [n for n in sys.modules if n == "fla" or n.startswith("fla.")]:
            del sys.modules[name]
        load_all("package")
        info["import"] = "package"
    return ops, errors, info


def linflow_chunk(lf, x: Inputs, gated: bool, l2: bool, chunk: int):
    g = x.g if gated else None
    return lambda: lf.delta_rule(x.q, x.k, x.v, x.beta, g, use_qk_l2norm=l2, chunk_size=chunk)[0]


def fla_chunk(fla: dict, x: Inputs, gated: bool, l2: bool, chunk: int):
    if gated:
        f = fla["chunk_gated_delta_rule"]
        return lambda: f(q=x.q, k=x.k, v=x.v, g=x.g, beta=x.beta, use_qk_l2norm_in_kernel=l2, chunk_size=chunk)[0]
    f = fla["chunk_delta_rule"]
    return lambda: f(q=x.q, k=x.k, v=x.v, beta=x.beta, use_qk_l2norm_in_kernel=l2, chunk_size=chunk)[0]


def linflow_decode(lf, s: DecodeSet, gated: bool, l2: bool):
    g = s.g if gated else None
    return lambda: lf.delta_rule_step(s.q, s.k, s.v, s.beta, s.state, g, use_qk_l2norm=l2)


def fla_decode(fla: dict, s: DecodeSet, gated: bool, l2: bool):
    """fla returns the new state in a fresh buffer (output_final_state=True) rather than updating in place: the
    same bytes moved."""
    if gated:
        f = fla["fused_recurrent_gated_delta_rule"]
        return lambda: f(q=s.q, k=s.k, v=s.v, g=s.g, beta=s.beta, initial_state=s.state, output_final_state=True,
                         use_qk_l2norm_in_kernel=l2)[0]
    f = fla["fused_recurrent_delta_rule"]
    return lambda: f(q=s.q, k=s.k, v=s.v, beta=s.beta, initial_state=s.state, output_final_state=True,
                     use_qk_l2norm_in_kernel=l2)[0]


# ------------------------------------------------------------------------------------------------------ runner
class Runner(hz.RowRunner):
    """Runs rows in order under a time budget; a failure becomes the row's note, never an exception."""

    def __init__(self, args, device, ceil: hz.Ceilings):
        super().__init__(args, device, ceil)
        self.decode_rows: list[dict] = []
        self.checks: dict = {}

    def train(self, impl: str, variant: str, shape: str, make_fn, x: Inputs, gated: bool, dims, refusable: bool,
              flops_fn, bytes_fn, check_against: torch.Tensor | None = None, keep_output: bool = False):
        """fwd and fwd+bwd rows of one implementation on one problem. Returns the fwd output if asked."""
        dev, out = self.device, None
        base = dict(section="train", variant=variant, shape=shape, impl=impl)
        rows = {p: dict(base, **{"pass": p}) for p in PASSES}
        try:
            fn = make_fn()
        except Exception as exc:  # noqa: BLE001
            for r in rows.values():
                r["note"] = self.failure(exc, refusable)
            self._emit(rows)
            return None
        leaves = x.leaves(gated) if x is not None else dims["leaves"]
        do = x.do if x is not None else dims["do"]

        def fwd():
            with torch.no_grad():
                return fn()

        def fwd_bwd():
            fn().backward(do)

        for p, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            r = rows[p]
            if (why := self.skip_reason()):
                r["note"] = why
                continue
            if p == "fwd+bwd" and rows["fwd"].get("note", "").startswith(("error", "OOM", "refused")):
                r["note"] = "skipped: forward failed"
                continue
            try:
                r["first_s"] = hz.first_call_s(run, dev)
                if p == "fwd" and (check_against is not None or keep_output):
                    out = fwd()
                    if check_against is not None:
                        diff = (out.float() - check_against.float()).abs().max().item()
                        ref = check_against.float().abs().max().item()
                        self.checks[(variant, shape)] = dict(max_abs=diff, rel=diff / max(ref, 1e-30))
                        r["check"] = f"{diff:.1e}"
                r["ms"] = hz.bench(run, device=dev, grad_to_none=leaves if p == "fwd+bwd" else None, **self.timing)
                if p == "fwd+bwd":
                    r["peak_mib"] = hz.peak_memory_mib(run, dev, grad_to_none=leaves)
                r.update(hz.throughput(r["ms"], flops_fn(p), bytes_fn(p), self.ceil))
            except Exception as exc:  # noqa: BLE001
                r["note"] = self.failure(exc, refusable)
            finally:
                for t in leaves:
                    t.grad = None
        self._emit(rows)
        return out if keep_output else None

    def _emit(self, rows: dict):
        for r in rows.values():
            self.rows.append(r)
            ms = f"{r['ms']:.3f} ms" if r.get("ms") is not None else "—"
            print(f"  {r['variant']:<15} {r['shape']:<10} {r['pass']:<7} {r['impl']:<11} {ms:>12}  "
                  f"{r.get('note', '')}", flush=True)

    def decode(self, impl: str, variant: str, l2name: str, fns: list, nbytes: int, refusable: bool):
        r = dict(section="decode", variant=variant, l2norm=l2name, impl=impl)
        self.decode_rows.append(r)
        if (why := self.skip_reason()):
            r["note"] = why
            return
        dev = self.device
        try:
            with torch.no_grad():
                r["first_s"] = hz.first_call_s(fns[0], dev)
                r["eager_us"] = 1e3 * hz.bench(fns, device=dev, **self.timing)
                r["eager_gbps"] = hz.throughput(r["eager_us"] / 1e3, None, nbytes, self.ceil)["gbps"]
                if hz.is_cuda(dev):
                    r["graph_us"] = 1e3 * hz.bench_graph(fns, device=dev, **self.timing)
                    t = hz.throughput(r["graph_us"] / 1e3, None, nbytes, self.ceil)
                    r["graph_gbps"], r["pct_copy"] = t["gbps"], t["pct_copy"]
                else:
                    r["note"] = "graph: n/a on CPU"
        except Exception as exc:  # noqa: BLE001
            r["note"] = self.failure(exc, refusable)
        us = lambda k: f"{r[k]:.1f} us" if r.get(k) is not None else "—"  # noqa: E731
        print(f"  decode {variant:<15} {l2name:<10} {impl:<8} eager {us('eager_us'):>10}  graph {us('graph_us'):>10}  "
              f"{r.get('note', '')}", flush=True)


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help=f"comma list: BxT or names {', '.join(SHAPES)} (default: all three)")
    p.add_argument("--skip-fla", action="store_true", help="no fla rows")
    p.add_argument("--skip-sdpa", action="store_true", help="no softmax attention rows")
    p.add_argument("--skip-decode", action="store_true", help="no decode rows")
    p.add_argument("--l2norm", choices=("op", "pre"), default="op",
                   help="op: q,k L2-normalised inside the op on both sides (linflow use_qk_l2norm=True, fla "
                        "use_qk_l2norm_in_kernel=True); pre: keys normalised beforehand, flags off (default: op)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--decode-batch", type=int, default=64)
    hz.add_common_args(p, "tiny shapes on CPU (checks the script; no fla)", fla_root=REPO / ".fla")
    args = p.parse_args(argv)
    hz.finish_common_args(args)
    if args.cpu_smoke:
        args.skip_fla = True
        args.heads, args.head_dim, args.decode_batch = 2, 32, 4
    args.shape_map = hz.parse_shapes(args.shapes, {"B2-T128": (2, 128)} if args.cpu_smoke else SHAPES, SHAPES)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, hz.interrupt)
    if (picked := hz.pick_device(args)) is None:
        return 2
    device, dtype = picked
    H, D, C = args.heads, args.head_dim, args.chunk_size
    env = hz.environment(device)
    notes: list[str] = []
    t_start = time.monotonic()
    print(f"bench_delta_rule on {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"commit {env['git_commit']}", flush=True)

    lf, lf_note = import_linflow()
    if lf_note:
        notes.append(lf_note)
    fla, fla_errors, fla_info = ({}, {}, {})
    if args.skip_fla:
        fla_errors = {n: "skipped (--skip-fla" + (", --cpu-smoke" if args.cpu_smoke else "") + ")" for n in FLA_OPS}
    else:
        fla, fla_errors, fla_info = import_fla(Path(args.fla_root))
        print(f"fla {fla_info.get('version')} ({fla_info.get('import')}): {sorted(fla) or 'nothing imported'}",
              flush=True)
    env["fla"] = fla_info
    for name, err in fla_errors.items():
        notes.append(f"fla {name}: {err}")

    smoke = args.cpu_smoke
    ceil = hz.measure_ceilings(device, copy_gib=0.0625 if smoke else (1.0 if args.quick else 2.0),
                               gemm_n=256 if smoke else 8192, dtype=dtype,
                               warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    notes += ceil.notes
    print(f"ceilings: copy {ceil.copy_gbps or 0:.0f} GB/s (read+write, {ceil.copy_bytes / 2**30:.2f} GiB moved), "
          f"GEMM {ceil.gemm_tflops or 0:.1f} TFLOP/s ({ceil.gemm_dtype} {ceil.gemm_n}^3)", flush=True)

    run = Runner(args, device, ceil)
    l2 = args.l2norm == "op"
    prenorm = not l2
    outputs: dict = {}
    interrupted = False
    try:
        # 1. linflow, training shapes (its numbers first, so a tight budget still yields them)
        print("linflow chunk:", flush=True)
        for shape, (B, T) in args.shape_map.items():
            x = make_inputs(B, T, H, D, D, device=device, dtype=dtype, prenorm=prenorm)
            for variant, gated in VARIANTS.items():
                flops = lambda p, B=B, T=T: delta_rule_flops(B, T, H, D, D, C, p)  # noqa: E731
                bytes_ = lambda p, x=x, gated=gated: delta_rule_bytes(x, gated, p)  # noqa: E731
                if lf is None:
                    run.train("linflow", variant, shape, lambda: hz.raise_(lf_note), x, gated, None, False, flops, bytes_)
                    continue
                o = run.train("linflow", variant, shape, lambda: linflow_chunk(lf, x, gated, l2, C), x, gated, None,
                              False, flops, bytes_, keep_output=not args.skip_fla)
                if o is not None:
                    outputs[(variant, shape)] = o
            del x
            hz.free_memory(device)

        # 2. decode: one token, B sequences, state [B, H, K, V] fp32; q,k pre-normalised and normalised in the op
        dec_variants = [] if args.skip_decode else [(v, g, l2n) for v, g in VARIANTS.items()
                                                    for l2n in ("pre-normed", "in op")]

        def decode_rows(impl, make, refusable):
            for variant, gated, l2name in dec_variants:
                sets = make_decode_sets(3, args.decode_batch, H, D, D, device=device, dtype=dtype,
                                        prenorm=l2name == "pre-normed")
                try:
                    fns = [make(s, gated, l2name == "in op") for s in sets]
                except Exception as exc:  # noqa: BLE001
                    run.decode_rows.append(dict(section="decode", variant=variant, l2norm=l2name, impl=impl,
                                                note=run.failure(exc, refusable)))
                    continue
                run.decode(impl, variant, l2name, fns, decode_bytes(sets[0], gated), refusable)
                del sets, fns
                hz.free_memory(device)

        if dec_variants:
            print("decode:", flush=True)
            if lf is not None:
                decode_rows("linflow", lambda s, g, n: linflow_decode(lf, s, g, n), False)

        # 3. fla: the same problems (same seeds), its output compared with ours
        if fla.get("chunk_delta_rule") or fla.get("chunk_gated_delta_rule"):
            print("fla chunk:", flush=True)
            for shape, (B, T) in args.shape_map.items():
                x = make_inputs(B, T, H, D, D, device=device, dtype=dtype, prenorm=prenorm)
                for variant, gated in VARIANTS.items():
                    op = "chunk_gated_delta_rule" if gated else "chunk_delta_rule"
                    flops = lambda p, B=B, T=T: delta_rule_flops(B, T, H, D, D, C, p)  # noqa: E731
                    bytes_ = lambda p, x=x, gated=gated: delta_rule_bytes(x, gated, p)  # noqa: E731
                    if op not in fla:
                        run.rows += [dict(section="train", variant=variant, shape=shape, impl="fla", note=f"fla: "
                                          f"{fla_errors.get(op, 'missing')}", **{"pass": p}) for p in PASSES]
                        continue
                    run.train("fla", variant, shape, lambda: fla_chunk(fla, x, gated, l2, C), x, gated, None, True,
                              flops, bytes_, check_against=outputs.pop((variant, shape), None))
                del x
                hz.free_memory(device)
        outputs.clear()
        if dec_variants and (fla.get("fused_recurrent_delta_rule") or fla.get("fused_recurrent_gated_delta_rule")):
            def make_fla_decode(s, gated, l2_in_op):
                op = "fused_recurrent_gated_delta_rule" if gated else "fused_recurrent_delta_rule"
                if op not in fla:
                    raise RuntimeError(f"fla {op}: {fla_errors.get(op, 'missing')}")
                return fla_decode(fla, s, gated, l2_in_op)

            print("fla decode:", flush=True)
            decode_rows("fla", make_fla_decode, True)

        # 4. causal softmax attention on the same B, T, H, D
        if not args.skip_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = [("sdpa-math", SDPBackend.MATH)] if smoke else \
                [("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)]
            print("softmax attention:", flush=True)
            for shape, (B, T) in args.shape_map.items():
                gen = torch.Generator(device=device).manual_seed(2)
                q, k, v, do = (torch.randn(B, H, T, D, generator=gen, device=device).to(dtype) for _ in range(4))
                leaves = [t.requires_grad_(True) for t in (q, k, v)]
                for name, backend in backends:
                    def make(backend=backend):
                        def attn():
                            with sdpa_kernel([backend]):
                                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        return attn
                    run.train(name, "causal softmax", shape, make, None, False, dict(leaves=leaves, do=do), True,
                              lambda p, B=B, T=T: hz.attention_flops(B, T, H, D, causal=True, mode=p),
                              lambda p: sdpa_bytes(q, k, v, p))
                del q, k, v, do, leaves
                hz.free_memory(device)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted (SIGTERM / Ctrl-C): the tables hold what was measured")

    if run.cuda_broken:
        notes.append(f"CUDA context broken, later rows skipped: {run.cuda_broken}")
    if run.deadline.expired():
        notes.append(f"time budget of {args.budget_s:.0f} s ran out: later rows skipped")
    payload = dict(env=env, args={k: v for k, v in vars(args).items() if k != "shape_map"},
                   shapes=args.shape_map, heads=H, head_dim=D, chunk_size=C, dtype=str(dtype),
                   ceilings=asdict(ceil), rows=run.rows, decode=run.decode_rows, gated_vs_ungated=gated_ratios(run.rows),
                   checks={f"{v} {s}": c for (v, s), c in run.checks.items()}, notes=notes,
                   elapsed_s=time.monotonic() - t_start, interrupted=interrupted)
    written = hz.save_results("delta_rule", payload, lambda path: plot(path, payload), args.results_dir)
    print_report(payload, ceil, written, args)
    return 0


# ------------------------------------------------------------------------------------------------------ report
def _row(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return {}


def gated_ratios(rows: list[dict]) -> list[dict]:
    out = []
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r.get("section") == "train"))
    for shape in shapes:
        for p in PASSES:
            entry = {"shape": shape, "pass": p}
            for impl in ("linflow", "fla"):
                u = _row(rows, impl=impl, variant="DeltaNet", shape=shape, **{"pass": p}).get("ms")
                g = _row(rows, impl=impl, variant="Gated DeltaNet", shape=shape, **{"pass": p}).get("ms")
                entry[f"{impl}_ungated_ms"], entry[f"{impl}_gated_ms"] = u, g
                entry[f"{impl}_ratio"] = g / u if u and g else None
            ratio = entry["linflow_ratio"]
            entry["within"] = None if ratio is None else ("yes" if ratio <= GATED_SLACK else "NO")
            out.append(entry)
    return out


def summary_rows(payload) -> list[dict]:
    rows, out = payload["rows"], []
    shapes = list(payload["shapes"])
    for variant in VARIANTS:
        for shape in shapes:
            for p in PASSES:
                ours = _row(rows, impl="linflow", variant=variant, shape=shape, **{"pass": p})
                fla = _row(rows, impl="fla", variant=variant, shape=shape, **{"pass": p})
                s = dict(variant=variant, shape=shape, **{"pass": p})
                s["ours_ms"], s["fla_ms"] = ours.get("ms"), fla.get("ms")
                if not s["fla_ms"] and fla.get("note"):
                    s["fla_ms"] = fla["note"].split(":")[0]  # refused / error / skipped
                if isinstance(s["fla_ms"], float) and s["ours_ms"]:
                    s["fla_over_ours"] = s["fla_ms"] / s["ours_ms"]
                for impl in ("sdpa-cudnn", "sdpa-flash", "sdpa-math"):
                    a = _row(rows, impl=impl, shape=shape, **{"pass": p}).get("ms")
                    if a is not None:
                        s[impl] = a
                s["pct_gemm"], s["pct_copy"] = ours.get("pct_gemm"), ours.get("pct_copy")
                s["ours_peak"], s["fla_peak"] = ours.get("peak_mib"), fla.get("peak_mib")
                s["check"] = fla.get("check")
                out.append(s)
    return out


def print_report(payload, ceil: hz.Ceilings, written, args) -> None:
    env, rows = payload["env"], payload["rows"]
    P = hz.print_block
    P("\n## Delta rule: all rows (full notes below the table)")
    clip = lambda r: dict(r, note=r["note"][:60] + "…" if len(r.get("note") or "") > 61 else r.get("note"))  # noqa: E731
    P(hz.markdown_table([clip(r) for r in rows], [("variant", "variant", ""), ("shape", "shape", ""), ("pass", "pass", ""),
                               ("impl", "impl", ""), ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".1f"),
                               ("pct_gemm", "%GEMM", ".1f"), ("gbps", "GB/s", ".0f"), ("pct_copy", "%copy", ".1f"),
                               ("peak_mib", "peak MiB", ".0f"), ("first_s", "1st call s", ".2f"),
                               ("note", "note", "")]))
    P("\nfiles: " + ", ".join(written))
    row_notes = [f"{r['impl']} {r['variant']} {r['pass']}: {r['note']}" for r in rows if r.get("note")]
    row_notes += [f"{r['impl']} decode {r['variant']} ({r['l2norm']}): {r['note']}" for r in payload["decode"]
                  if r.get("note")]
    notes = list(dict.fromkeys(payload["notes"] + [n for n in row_notes if ": skipped" not in n
                                                   and "graph: n/a" not in n]))
    if notes:
        P("\nnotes:")
        for n in notes:
            P(f"- {n}")
    P(f"\n# linflow delta rule — {env['device']} — {env['date']} — torch {env['torch']}, triton {env['triton']}, "
      f"fla {env.get('fla', {}).get('version')}, commit {env['git_commit']}")
    P(f"ceilings: copy {ceil.copy_gbps or 0:.0f} GB/s (read+write), GEMM {ceil.gemm_tflops or 0:.1f} TFLOP/s "
      f"({ceil.gemm_dtype} {ceil.gemm_n}^3).  H={payload['heads']} K=V={payload['head_dim']} {payload['dtype']} "
      f"chunk {payload['chunk_size']}, q/k l2norm: {'in op (both)' if args.l2norm == 'op' else 'pre-normalised (both)'}"
      f"; elapsed {payload['elapsed_s']:.0f} s")
    if payload["decode"]:
        P(f"\n## Decode step: B={args.decode_batch}, one token, state [B,H,K,V] fp32 "
          f"(bytes = state read+write + q,k,v,beta,g,o; %copy of graph replay)")
        P(hz.markdown_table(payload["decode"], [
            ("variant", "variant", ""), ("l2norm", "q,k norm", ""), ("impl", "impl", ""),
            ("eager_us", "eager µs", ".1f"), ("graph_us", "graph µs", ".1f"), ("graph_gbps", "graph GB/s", ".0f"),
            ("pct_copy", "%copy", ".1f"), ("note", "note", "")]))
    if payload["gated_vs_ungated"]:
        P(f"\n## Gated / ungated time (goal: linflow ≤ {GATED_SLACK:.2f})")
        P(hz.markdown_table(payload["gated_vs_ungated"], [
            ("shape", "shape", ""), ("pass", "pass", ""), ("linflow_ungated_ms", "ours ungated ms", ".3f"),
            ("linflow_gated_ms", "ours gated ms", ".3f"), ("linflow_ratio", "ours gated/ungated", ".2f"),
            ("within", "≤1.15", ""), ("fla_ratio", "fla gated/ungated", ".2f")]))
    P("\n## Summary: fla/ours > 1 means linflow is faster; % of measured ceilings; Δo = max|o_fla - o_ours|")
    cols = [("variant", "variant", ""), ("shape", "shape", ""), ("pass", "pass", ""), ("ours_ms", "ours ms", ".3f"),
            ("fla_ms", "fla ms", ".3f"), ("fla_over_ours", "fla/ours", ".2f")]
    summary = summary_rows(payload)
    for impl in ("sdpa-cudnn", "sdpa-flash", "sdpa-math"):
        if any(impl in s for s in summary):
            cols.append((impl, f"{impl} ms", ".3f"))
    cols += [("pct_gemm", "ours %GEMM", ".1f"), ("pct_copy", "ours %copy", ".1f"), ("ours_peak", "ours MiB", ".0f"),
             ("fla_peak", "fla MiB", ".0f"), ("check", "Δo", "")]
    P(hz.markdown_table(summary, cols))


def plot(path: Path, payload) -> str | None:
    rows, shapes = payload["rows"], list(payload["shapes"])
    panels = []
    series_keys = [("linflow", "DeltaNet"), ("fla", "DeltaNet"), ("linflow", "Gated DeltaNet"),
                   ("fla", "Gated DeltaNet"), ("sdpa-cudnn", "causal softmax"), ("sdpa-flash", "causal softmax"),
                   ("sdpa-math", "causal softmax")]
    for p in PASSES:
        series = {}
        for impl, variant in series_keys:
            vals = [_row(rows, impl=impl, variant=variant, shape=s, **{"pass": p}).get("ms") for s in shapes]
            if any(v is not None for v in vals):
                series[f"{impl} {variant}" if not impl.startswith("sdpa") else impl] = vals
        panels.append(dict(title=f"{p} time (ms, log scale; lower is better)", groups=shapes, series=series,
                           ylabel="ms", log=True))
    dec = payload["decode"]
    if dec:
        groups = list(dict.fromkeys(f"{r['variant']}, {r['l2norm']}" for r in dec))
        series = {}
        for impl in ("linflow", "fla"):
            for mode in ("eager_us", "graph_us"):
                vals = [_row(dec, impl=impl, variant=g.split(", ")[0], l2norm=g.split(", ")[1]).get(mode)
                        for g in groups]
                if any(v is not None for v in vals):
                    series[f"{impl} {mode.split('_')[0]}"] = vals
        panels.append(dict(title="decode step (µs; lower is better)", groups=groups, series=series, ylabel="µs"))
    return hz.plot_bar_panels(path, hz.plot_title("Delta rule: linflow vs fla vs SDPA", payload["env"]), panels)


if __name__ == "__main__":
    sys.exit(main())
