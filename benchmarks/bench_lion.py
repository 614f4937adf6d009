#!/usr/bin/env python
"""LION (bidirectional linear attention, ALGORITHMS.md §4): linflow beside non-causal softmax attention, the naive
masked PyTorch form and flash-bidirectional-linear-attention (LION-lit only, optional), plus recurrent-mode memory
and time vs T.

    python benchmarks/bench_lion.py                 # GPU, full run
    python benchmarks/bench_lion.py --quick         # fewer repetitions
    python benchmarks/bench_lion.py --shapes 8x4096 --skip-naive
    python benchmarks/bench_lion.py --cpu-smoke     # tiny shapes on CPU: checks this script end to end

Training rows (issue #4): bf16, H=16, K=V=128, B8·T4096 and B2·T16384, fwd and fwd+bwd of linflow.lion for each
decay (none / fixed / selective; normalize=True, mode="chunked"; q, k = (SiLU(x)+0.5)/||·|| as the layer does for
-d/-s, elu(x)+1 for LION-lit; lam = sigmoid(randn(H)); g = logsigmoid(randn)). Beside them: SDPA non-causal
(flash, cuDNN), the naive masked form (explicit T×T mask, only where it fits: otherwise a note) and fbla
(flash_bla.ops.linear_attn, decay none, if importable). Then: recurrent vs chunked forward (time and peak extra
memory) and the selective chunked time vs T at B·T = 32768. ms, ratio vs SDPA flash, % of the ceilings measured in
this process; goals from the issue as columns. Benchmarks never assert. The tables print last.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "python"))

import harness as hz  # noqa: E402

SHAPES = {"B8-T4096": (8, 4096), "B2-T16384": (2, 16384)}
DECAYS = {"LION-lit": "none", "LION-d": "fixed", "LION-s": "selective"}  # name -> decay
PASSES = ("fwd", "fwd+bwd")
SCALING_TS = (1024, 2048, 4096, 8192, 16384)
SCALING_TOKENS = 32768  # B·T of the time-vs-T rows
GOALS = {("LION-s", "B8-T4096", "fwd"): 0.5, ("LION-s", "B8-T4096", "fwd+bwd"): 1.5}  # ms, issue #4


# --------------------------------------------------------------------------------------------- work and traffic
def lion_fwd_flops(B: int, T: int, H: int, K: int, V: int, C: int = 64) -> float:
    """ESTIMATE of the chunked forward: two chunk sweeps (forward and backward direction) of a gated linear
    attention, each ≈ 4 K V + 2 C (K + V) per token and head:
      4 K V        state product Q·S (2 K V) and state update K^T·V (2 K V) per row;
      2 C (K + V)  the intra-chunk masked Q K^T (2 C K) and (QK^T∘M)·V (2 C V).
    The normaliser states (K-vectors) and the mask exponentials are ignored. Total ≈ 2 × (4KV + 2C(K+V))."""
    return float(B * T * H) * 2 * (4 * K * V + 2 * C * (K + V))


def lion_flops(B, T, H, K, V, C, mode: str) -> float:
    """fwd, or fwd+bwd with the backward ≈ 2.5× the forward (transposed products of every forward GEMM plus the
    state recomputation) — an estimate, as for the delta rule."""
    fwd = lion_fwd_flops(B, T, H, K, V, C)
    return fwd if mode == "fwd" else 3.5 * fwd


def lion_recurrent_flops(B, T, H, K, V) -> float:
    """ESTIMATE of the recurrent (two token scans) forward: per token, head and direction a state update (2 K V) and
    a read-out q^T S (2 K V): 8 K V per token and head."""
    return float(B * T * H) * 8 * K * V


def naive_flops(B, T, H, K, V, mode: str) -> float:
    """Explicit T×T form: Q K^T (2 T² K) and A V (2 T² V) per head, plus the mask and row sums (ignored);
    backward ≈ 2.5× (as attention)."""
    fwd = float(B * H) * T * T * 2 * (K + V)
    return fwd if mode == "fwd" else 3.5 * fwd


def io_bytes(ins: list, out_like: torch.Tensor, mode: str) -> int:
    """Minimal HBM traffic: fwd reads the inputs and writes o; fwd+bwd adds reading inputs + do and writing one
    gradient per input (states are recomputed, never stored)."""
    i = hz.nbytes(*ins)
    fwd = i + hz.nbytes(out_like)
    return fwd if mode == "fwd" else fwd + i + hz.nbytes(out_like) + i


def sdpa_bytes(q, mode: str) -> int:
    """fwd: read q, k, v, write o; bwd: read q, k, v, o, do, write dq, dk, dv (log-sum-exp rows ignored)."""
    fwd = 4 * hz.nbytes(q)
    return fwd if mode == "fwd" else fwd + 8 * hz.nbytes(q)


# ------------------------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    q: torch.Tensor  # [B, T, H, K], non-negative feature map applied
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor  # [B, T, H] logsigmoid(randn), fp32
    lam: torch.Tensor  # [H] sigmoid(randn), fp32
    do: torch.Tensor

    def leaves(self, decay: str) -> list[torch.Tensor]:
        extra = {"none": [], "fixed": [self.lam], "selective": [self.g]}[decay]
        return [self.q, self.k, self.v] + extra


def feature_map(x: torch.Tensor, decay: str) -> torch.Tensor:
    """The layer's maps: elu(x)+1 for LION-lit, (SiLU(x)+0.5)/||SiLU(x)+0.5|| for -d/-s (both > 0)."""
    if decay == "none":
        return F.elu(x) + 1
    y = F.silu(x) + 0.5
    return y / y.norm(dim=-1, keepdim=True)


def make_inputs(B, T, H, K, V, decay, *, device, dtype, seed=0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.float32)  # noqa: E731
    q, k = feature_map(rnd(B, T, H, K), decay).to(dtype), feature_map(rnd(B, T, H, K), decay).to(dtype)
    x = Inputs(q, k, rnd(B, T, H, V).to(dtype), F.logsigmoid(rnd(B, T, H)), torch.sigmoid(rnd(H)),
               rnd(B, T, H, V).to(dtype))
    for t in (x.q, x.k, x.v, x.g, x.lam):
        t.requires_grad_(True)
    return x


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


FBLA_CANDIDATES = (  # (module, function): fla-org/flash-bidirectional-linear-attention, [B, H, T, D] layout
    ("flash_bla.ops.linear_attn.fused", "linear_attention"),
    ("flash_bla.ops.linear_attn", "linear_attention"),
    ("fbi_la.ops.linear_attn.fused", "linear_attention"),
    ("fbi_la.ops.linear_attn", "linear_attention"),
    ("fbi_la", "linear_attention"),
)


def import_fbla(root: Path = REPO / ".fla"):
    """Optional: the first candidate that imports (from `root`, the git-ignored folder that also holds fla/, or
    site-packages). Returns (fn, name, error)."""
    import importlib

    if root.is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))

    errors = []
    for mod, fn in FBLA_CANDIDATES:
        try:
            return getattr(importlib.import_module(mod), fn), f"{mod}.{fn}", None
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{mod}: {hz.short_error(exc, 80)}")
    return None, None, "not importable: " + "; ".join(errors[:2])


def lion_fn(lf, x: Inputs, decay: str, mode: str, C: int):
    g = x.g if decay == "selective" else None
    lam = x.lam if decay == "fixed" else None
    return lambda: lf.lion(x.q, x.k, x.v, g, decay=decay, lam=lam, normalize=True, mode=mode, chunk_size=C)


def naive_lion(q, k, v, g, lam, decay: str, eps: float = 1e-6):
    """The explicit masked form: M from cumulative log gates, o = (Q K^T ∘ M) V / rowsum(Q K^T ∘ M).
    q, k, v [B, T, H, D] -> [B, H, T, D]; T×T tensors in fp32 (mask) and q's dtype (scores)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    T = q.shape[2]
    s = q @ k.transpose(-1, -2)  # [B, H, T, T]
    if decay != "none":
        if decay == "fixed":
            idx = torch.arange(T, device=q.device, dtype=torch.float32)
            c = lam.float().log()[None, :, None] * idx  # [1, H, T]: cumulative log of a constant gate
        else:
            c = g.float().transpose(1, 2).cumsum(-1)  # [B, H, T]
        d = c[..., :, None] - c[..., None, :]
        if torch.is_grad_enabled():
            m = torch.exp(-d.abs())
        else:
            m = d.abs_().neg_().exp_()
            del d
        s = s * m.to(s.dtype)
        del m
    num = s @ v
    den = s.sum(-1, keepdim=True, dtype=torch.float32) + eps
    return (num.float() / den).to(q.dtype).transpose(1, 2)


def naive_bytes_needed(B, H, T, decay, mode) -> int:
    """Rough peak of the naive form: T×T tensors (fp32 mask + bf16 scores / masked scores / fp32 row sum copy);
    about 4 fp32-sized T×T tensors forward, 8 with autograd's saved tensors and gradients."""
    per = B * H * T * T * 4
    n = (2 if decay == "none" else 4) * (1 if mode == "fwd" else 2)
    return n * per


# ------------------------------------------------------------------------------------------------------ runner
class Runner(hz.RowRunner):
    """Runs rows in order under a time budget; a failure becomes the row's note, never an exception."""

    def note_rows(self, section, variant, shape, impl, note, passes=PASSES):
        rows = {p: dict(section=section, variant=variant, shape=shape, impl=impl, note=note, **{"pass": p})
                for p in passes}
        self._emit(rows)

    def train(self, section, impl, variant, shape, make_fn, leaves, do, refusable, flops_fn, bytes_fn,
              passes=PASSES, extra=None):
        dev = self.device
        base = dict(section=section, variant=variant, shape=shape, impl=impl, **(extra or {}))
        rows = {p: dict(base, **{"pass": p}) for p in passes}
        try:
            fn = make_fn()
        except Exception as exc:  # noqa: BLE001
            for r in rows.values():
                r["note"] = self.failure(exc, refusable)
            self._emit(rows)
            return rows

        def fwd():
            with torch.no_grad():
                return fn()

        def fwd_bwd():
            fn().backward(do)

        for p in passes:
            r, run = rows[p], (fwd if p == "fwd" else fwd_bwd)
            if (why := self.skip_reason()):
                r["note"] = why
                continue
            if p == "fwd+bwd" and "fwd" in rows and (rows["fwd"].get("note") or "").startswith(
                    ("error", "OOM", "refused")):
                r["note"] = "skipped: forward failed"
                continue
            try:
                r["first_s"] = hz.first_call_s(run, dev)
                r["ms"] = hz.bench(run, device=dev, grad_to_none=leaves if p == "fwd+bwd" else None, **self.timing)
                r["peak_mib"] = hz.peak_memory_mib(run, dev, grad_to_none=leaves if p == "fwd+bwd" else None)
                r.update(hz.throughput(r["ms"], flops_fn(p), bytes_fn(p), self.ceil))
            except Exception as exc:  # noqa: BLE001
                r["note"] = self.failure(exc, refusable)
            finally:
                for t in leaves:
                    t.grad = None
        self._emit(rows)
        return rows

    def _emit(self, rows: dict):
        for r in rows.values():
            self.rows.append(r)
            ms = f"{r['ms']:.3f} ms" if r.get("ms") is not None else "—"
            print(f"  {r['section']:<9} {r['variant']:<14} {r['shape']:<10} {r['pass']:<7} {r['impl']:<16} "
                  f"{ms:>12}  {r.get('note', '')}", flush=True)


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help=f"comma list: BxT or names {', '.join(SHAPES)} (default: both)")
    p.add_argument("--decays", default="none,fixed,selective", help="comma list of none, fixed, selective")
    p.add_argument("--skip-sdpa", action="store_true", help="no softmax attention rows")
    p.add_argument("--skip-naive", action="store_true", help="no naive masked-form rows")
    p.add_argument("--skip-fbla", action="store_true", help="no flash-bidirectional-linear-attention rows")
    p.add_argument("--skip-recurrent", action="store_true", help="no recurrent-vs-chunked rows")
    p.add_argument("--skip-scaling", action="store_true", help="no time-vs-T rows")
    p.add_argument("--naive-max-gib", type=float, default=None,
                   help="skip the naive form when its estimated peak exceeds this (default: 85%% of free memory)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    p.add_argument("--chunk-size", type=int, default=64)
    hz.add_common_args(p, "tiny shapes on CPU (checks the script)")
    args = p.parse_args(argv)
    hz.finish_common_args(args)
    args.decay_list = [d for d in (s.strip() for s in args.decays.split(",")) if d]
    bad = [d for d in args.decay_list if d not in DECAYS.values()]
    if bad:
        raise SystemExit(f"--decays: unknown {bad}")
    args.scaling_tokens, args.scaling_ts = SCALING_TOKENS, SCALING_TS
    if args.cpu_smoke:
        args.heads, args.head_dim, args.chunk_size = 2, 32, 16
        args.scaling_tokens, args.scaling_ts = 256, (32, 64, 128, 256)
    args.shape_map = hz.parse_shapes(args.shapes, {"B2-T128": (2, 128)} if args.cpu_smoke else SHAPES, SHAPES)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, hz.interrupt)
    if (picked := hz.pick_device(args)) is None:
        return 2
    device, dtype = picked
    H, D, C = args.heads, args.head_dim, args.chunk_size
    smoke = args.cpu_smoke
    env = hz.environment(device)
    notes: list[str] = []
    t_start = time.monotonic()
    print(f"bench_lion on {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"commit {env['git_commit']}", flush=True)

    lf, lf_note = import_linflow()
    if lf_note:
        notes.append(lf_note)
    fbla, fbla_name, fbla_err = (None, None, "skipped (--skip-fbla)") if args.skip_fbla else import_fbla()
    env["fbla"] = dict(function=fbla_name, error=fbla_err)
    print(f"fbla: {fbla_name or fbla_err}", flush=True)

    ceil = hz.measure_ceilings(device, copy_gib=0.0625 if smoke else (1.0 if args.quick else 2.0),
                               gemm_n=256 if smoke else 8192, dtype=dtype,
                               warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    notes += ceil.notes
    print(f"ceilings: copy {ceil.copy_gbps or 0:.0f} GB/s (read+write, {ceil.copy_bytes / 2**30:.2f} GiB moved), "
          f"GEMM {ceil.gemm_tflops or 0:.1f} TFLOP/s ({ceil.gemm_dtype} {ceil.gemm_n}^3)", flush=True)

    run = Runner(args, device, ceil)
    mem_rows: list[dict] = []
    interrupted = False
    try:
        # 1. linflow LION, chunked, each decay (its numbers first, so a tight budget still yields them)
        print("linflow lion (chunked):", flush=True)
        for shape, (B, T) in args.shape_map.items():
            for name, decay in DECAYS.items():
                if decay not in args.decay_list:
                    continue
                x = make_inputs(B, T, H, D, D, decay, device=device, dtype=dtype)
                leaves = x.leaves(decay)
                flops = lambda p, B=B, T=T: lion_flops(B, T, H, D, D, C, p)  # noqa: E731
                bytes_ = lambda p, x=x, leaves=leaves: io_bytes(leaves, x.do, p)  # noqa: E731
                make = (lambda: hz.raise_(lf_note)) if lf is None else \
                    (lambda x=x, decay=decay: lion_fn(lf, x, decay, "chunked", C))
                run.train("train", "linflow", name, shape, make, leaves, x.do, False, flops, bytes_)
                del x, leaves
                hz.free_memory(device)

        # 2. non-causal softmax attention on the same B, T, H, D
        if not args.skip_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = [("sdpa-math", SDPBackend.MATH)] if smoke else \
                [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)]
            print("softmax attention (non-causal):", flush=True)
            for shape, (B, T) in args.shape_map.items():
                gen = torch.Generator(device=device).manual_seed(2)
                q, k, v, do = (torch.randn(B, H, T, D, generator=gen, device=device).to(dtype) for _ in range(4))
                leaves = [t.requires_grad_(True) for t in (q, k, v)]
                for impl, backend in backends:
                    def make(backend=backend, q=q, k=k, v=v):
                        def attn():
                            with sdpa_kernel([backend]):
                                return F.scaled_dot_product_attention(q, k, v, is_causal=False)
                        return attn
                    run.train("train", impl, "softmax", shape, make, leaves, do, True,
                              lambda p, B=B, T=T: hz.attention_flops(B, T, H, D, causal=False, mode=p),
                              lambda p, q=q: sdpa_bytes(q, p))
                del q, k, v, do, leaves
                hz.free_memory(device)

        # 3. the naive masked form, where it fits
        if not args.skip_naive:
            print("naive masked form:", flush=True)
            for shape, (B, T) in args.shape_map.items():
                for name, decay in DECAYS.items():
                    if decay not in args.decay_list:
                        continue
                    passes = []
                    for p in PASSES:
                        need = naive_bytes_needed(B, H, T, decay, p)
                        if hz.is_cuda(device):
                            free = torch.cuda.mem_get_info(device)[0]
                            limit = args.naive_max_gib * 2**30 if args.naive_max_gib else 0.85 * free
                            if need > limit:
                                run.note_rows("train", name, shape, "naive-masked",
                                              f"skipped: needs ≈{need / 2**30:.0f} GiB of T×T tensors "
                                              f"(limit {limit / 2**30:.0f} GiB)", passes=(p,))
                                continue
                        passes.append(p)
                    if not passes:
                        continue
                    x = make_inputs(B, T, H, D, D, decay, device=device, dtype=dtype)
                    leaves = x.leaves(decay)
                    run.train("train", "naive-masked", name, shape,
                              lambda x=x, decay=decay: (lambda: naive_lion(x.q, x.k, x.v, x.g, x.lam, decay)),
                              leaves, x.do, True, lambda p, B=B, T=T: naive_flops(B, T, H, D, D, p),
                              lambda p, x=x, leaves=leaves: io_bytes(leaves, x.do, p), passes=tuple(passes))
                    del x, leaves
                    hz.free_memory(device)

        # 4. flash-bidirectional-linear-attention, LION-lit only ([B, H, T, D]; its own normalisation convention)
        if not args.skip_fbla and "none" in args.decay_list:
            print("fbla (LION-lit):", flush=True)
            for shape, (B, T) in args.shape_map.items():
                if fbla is None:
                    run.note_rows("train", "LION-lit", shape, "fbla", fbla_err)
                    continue
                x = make_inputs(B, T, H, D, D, "none", device=device, dtype=dtype)
                qh, kh, vh, doh = (t.detach().transpose(1, 2).contiguous() for t in (x.q, x.k, x.v, x.do))
                leaves = [t.requires_grad_(True) for t in (qh, kh, vh)]
                run.train("train", "fbla", "LION-lit", shape, lambda: (lambda: fbla(qh, kh, vh)), leaves, doh, True,
                          lambda p, B=B, T=T: lion_flops(B, T, H, D, D, C, p),
                          lambda p: io_bytes(leaves, doh, p))
                del x, qh, kh, vh, doh, leaves
                hz.free_memory(device)

        # 5. recurrent vs chunked: forward time and peak extra memory (max_memory_allocated above the inputs)
        if not args.skip_recurrent and lf is not None:
            print("recurrent vs chunked (fwd):", flush=True)
            for shape, (B, T) in args.shape_map.items():
                for name, decay in DECAYS.items():
                    if decay not in args.decay_list:
                        continue
                    x = make_inputs(B, T, H, D, D, decay, device=device, dtype=dtype)
                    leaves = x.leaves(decay)
                    entry = dict(variant=name, shape=shape)
                    for mode in ("chunked", "recurrent"):
                        fl = (lambda p, B=B, T=T: lion_recurrent_flops(B, T, H, D, D)) if mode == "recurrent" \
                            else (lambda p, B=B, T=T: lion_flops(B, T, H, D, D, C, p))
                        rows = run.train("mode", f"linflow-{mode}", name, shape,
                                         lambda x=x, decay=decay, mode=mode: lion_fn(lf, x, decay, mode, C),
                                         leaves, x.do, False, fl,
                                         lambda p, x=x, leaves=leaves: io_bytes(leaves, x.do, p), passes=("fwd",))
                        r = rows["fwd"]
                        entry[f"{mode}_ms"], entry[f"{mode}_mib"] = r.get("ms"), r.get("peak_mib")
                        if r.get("note"):
                            entry[f"{mode}_note"] = r["note"]
                    if entry.get("chunked_ms") and entry.get("recurrent_ms"):
                        entry["rec_over_chunked"] = entry["recurrent_ms"] / entry["chunked_ms"]
                    if entry.get("chunked_mib") and entry.get("recurrent_mib") is not None:
                        entry["mem_ratio"] = entry["recurrent_mib"] / entry["chunked_mib"]
                    mem_rows.append(entry)
                    del x, leaves
                    hz.free_memory(device)

        # 6. time vs T at fixed B·T, selective decay, chunked
        if not args.skip_scaling and lf is not None:
            print(f"time vs T (LION-s, chunked, B·T = {args.scaling_tokens}):", flush=True)
            for T in args.scaling_ts:
                B = max(1, args.scaling_tokens // T)
                shape = f"B{B}-T{T}"
                x = make_inputs(B, T, H, D, D, "selective", device=device, dtype=dtype)
                leaves = x.leaves("selective")
                run.train("scaling", "linflow", "LION-s", shape,
                          lambda x=x: lion_fn(lf, x, "selective", "chunked", C), leaves, x.do, False,
                          lambda p, B=B, T=T: lion_flops(B, T, H, D, D, C, p),
                          lambda p, x=x, leaves=leaves: io_bytes(leaves, x.do, p), extra=dict(T=T, B=B))
                del x, leaves
                hz.free_memory(device)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted (SIGTERM / Ctrl-C): the tables hold what was measured")

    if run.cuda_broken:
        notes.append(f"CUDA context broken, later rows skipped: {run.cuda_broken}")
    if run.deadline.expired():
        notes.append(f"time budget of {args.budget_s:.0f} s ran out: later rows skipped")
    notes.append("FLOP counts are estimates: chunked LION ≈ 2 × (4KV + 2C(K+V)) per token-head forward, backward "
                 "≈ 2.5× forward; recurrent ≈ 8KV; naive ≈ 2T(K+V) per token-head; SDPA 4T·D per token-head (non-causal)")
    payload = dict(env=env, args={k: v for k, v in vars(args).items() if k != "shape_map"},
                   shapes=args.shape_map, heads=H, head_dim=D, chunk_size=C, dtype=str(dtype),
                   ceilings=asdict(ceil), rows=run.rows, modes=mem_rows, summary=summary_rows(run.rows, args),
                   scaling=scaling_rows(run.rows), notes=notes, elapsed_s=time.monotonic() - t_start,
                   interrupted=interrupted)
    written = hz.save_results("lion", payload, lambda path: plot(path, payload), args.results_dir)
    print_report(payload, ceil, written, args)
    return 0


# ------------------------------------------------------------------------------------------------------ report
def _row(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return {}


def _ms_or_note(r: dict, full: bool = False):
    """The row's ms, else the head of its note (the whole note, clipped, with ``full``: import errors)."""
    if not r:
        return None
    if r.get("ms") is not None:
        return r["ms"]
    note = r.get("note") or "—"
    return (note[:70] + "…" if len(note) > 71 else note) if full else note.split(":")[0]


def summary_rows(rows, args) -> list[dict]:
    out = []
    for shape in args.shape_map:
        for p in PASSES:
            ref = _row(rows, section="train", impl="sdpa-flash", shape=shape, **{"pass": p}).get("ms") or \
                _row(rows, section="train", impl="sdpa-math", shape=shape, **{"pass": p}).get("ms")
            for name in DECAYS:
                ours = _row(rows, section="train", impl="linflow", variant=name, shape=shape, **{"pass": p})
                if not ours:
                    continue
                s = dict(variant=name, shape=shape, **{"pass": p}, ours_ms=_ms_or_note(ours))
                for impl in ("sdpa-flash", "sdpa-cudnn", "sdpa-math"):
                    a = _row(rows, section="train", impl=impl, shape=shape, **{"pass": p})
                    if a:
                        s[impl] = _ms_or_note(a)
                s["naive"] = _ms_or_note(_row(rows, section="train", impl="naive-masked", variant=name, shape=shape,
                                              **{"pass": p}))
                if name == "LION-lit":
                    s["fbla"] = _ms_or_note(_row(rows, section="train", impl="fbla", shape=shape, **{"pass": p}), True)
                if ours.get("ms") and ref:
                    s["ours_over_sdpa"] = ours["ms"] / ref
                s["pct_gemm"], s["pct_copy"], s["peak_mib"] = ours.get("pct_gemm"), ours.get("pct_copy"), \
                    ours.get("peak_mib")
                goal = GOALS.get((name, shape, p))
                if goal is not None:
                    s["goal_ms"] = goal
                    s["meets_goal"] = None if ours.get("ms") is None else ("yes" if ours["ms"] <= goal else "NO")
                out.append(s)
    return out


def scaling_rows(rows) -> list[dict]:
    out, base = [], {}
    for r in rows:
        if r.get("section") != "scaling":
            continue
        e = _row(out, T=r["T"]) or out.append(dict(T=r["T"], B=r["B"], shape=r["shape"])) or out[-1]
        e[f"{r['pass']}_ms"] = r.get("ms")
        if r.get("note"):
            e["note"] = r["note"]
    for e in out:
        for p in PASSES:
            ms = e.get(f"{p}_ms")
            if ms and p not in base:
                base[p] = (e["T"], ms)
            if ms and p in base:
                e[f"{p}_rel"] = ms / base[p][1]  # time relative to the shortest T (same B·T): ≈1 if linear in T
    return out


def print_report(payload, ceil: hz.Ceilings, written, args) -> None:
    env, rows = payload["env"], payload["rows"]
    P = hz.print_block
    P("\n## LION: all rows (full notes below the table)")
    clip = lambda r: dict(r, note=r["note"][:60] + "…" if len(r.get("note") or "") > 61 else r.get("note"))  # noqa: E731
    P(hz.markdown_table([clip(r) for r in rows], [
        ("section", "section", ""), ("variant", "variant", ""), ("shape", "shape", ""), ("pass", "pass", ""),
        ("impl", "impl", ""), ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".1f"), ("pct_gemm", "%GEMM", ".1f"),
        ("gbps", "GB/s", ".0f"), ("pct_copy", "%copy", ".1f"), ("peak_mib", "peak MiB", ".0f"),
        ("first_s", "1st call s", ".2f"), ("note", "note", "")]))
    P("\nfiles: " + ", ".join(written))
    row_notes = [f"{r['impl']} {r['variant']} {r['shape']} {r['pass']}: {r['note']}" for r in rows if r.get("note")]
    notes = list(dict.fromkeys(payload["notes"] + [n for n in row_notes if ": skipped: time" not in n]))
    if notes:
        P("\nnotes:")
        for n in notes:
            P(f"- {n}")
    P(f"\n# linflow LION — {env['device']} — {env['date']} — torch {env['torch']}, triton {env['triton']}, "
      f"commit {env['git_commit']}, fbla {env['fbla'].get('function') or 'not importable'}")
    P(f"ceilings: copy {ceil.copy_gbps or 0:.0f} GB/s (read+write), GEMM {ceil.gemm_tflops or 0:.1f} TFLOP/s "
      f"({ceil.gemm_dtype} {ceil.gemm_n}^3).  H={payload['heads']} K=V={payload['head_dim']} {payload['dtype']} "
      f"chunk {payload['chunk_size']}, normalize=True, mode=chunked; elapsed {payload['elapsed_s']:.0f} s")
    if payload["modes"]:
        P("\n## Recurrent vs chunked forward (peak MiB = max_memory_allocated above the inputs)")
        P(hz.markdown_table(payload["modes"], [
            ("variant", "variant", ""), ("shape", "shape", ""), ("chunked_ms", "chunked ms", ".3f"),
            ("recurrent_ms", "recurrent ms", ".3f"), ("rec_over_chunked", "rec/chunked", ".2f"),
            ("chunked_mib", "chunked MiB", ".1f"), ("recurrent_mib", "recurrent MiB", ".1f"),
            ("mem_ratio", "rec/chunked mem", ".2f")]))
    if payload["scaling"]:
        P(f"\n## Time vs T, LION-s chunked, B·T = {args.scaling_tokens} (rel = time / time at the shortest T; "
          f"≈1 means linear in T)")
        P(hz.markdown_table(payload["scaling"], [
            ("shape", "shape", ""), ("T", "T", ""), ("fwd_ms", "fwd ms", ".3f"), ("fwd_rel", "fwd rel", ".2f"),
            ("fwd+bwd_ms", "fwd+bwd ms", ".3f"), ("fwd+bwd_rel", "fwd+bwd rel", ".2f"), ("note", "note", "")]))
    P("\n## Summary: linflow LION (chunked) vs SDPA non-causal; ours/sdpa < 1 means LION is faster; "
      "goals from issue #4 (LION-s B8-T4096: fwd ≤ 0.5 ms, fwd+bwd ≤ 1.5 ms); %GEMM/%copy from estimated FLOPs/bytes")
    summary = payload["summary"]
    cols = [("variant", "variant", ""), ("shape", "shape", ""), ("pass", "pass", ""), ("ours_ms", "ours ms", ".3f")]
    for impl in ("sdpa-flash", "sdpa-cudnn", "sdpa-math"):
        if any(impl in s for s in summary):
            cols.append((impl, f"{impl} ms", ".3f"))
    cols += [("ours_over_sdpa", "ours/sdpa", ".2f"), ("naive", "naive ms", ".3f"), ("fbla", "fbla ms", ".3f"),
             ("pct_gemm", "%GEMM", ".1f"), ("pct_copy", "%copy", ".1f"), ("peak_mib", "peak MiB", ".0f"),
             ("goal_ms", "goal ms", ".1f"), ("meets_goal", "meets goal", "")]
    P(hz.markdown_table(summary, cols))


def plot(path: Path, payload) -> str | None:
    rows, shapes = payload["rows"], list(payload["shapes"])
    panels = []
    series_keys = [("linflow", n) for n in DECAYS] + [("naive-masked", n) for n in DECAYS] + \
        [("fbla", "LION-lit"), ("sdpa-flash", "softmax"), ("sdpa-cudnn", "softmax"), ("sdpa-math", "softmax")]
    for p in PASSES:
        series = {}
        for impl, variant in series_keys:
            vals = [_row(rows, section="train", impl=impl, variant=variant, shape=s, **{"pass": p}).get("ms")
                    for s in shapes]
            if any(v is not None for v in vals):
                series[impl if impl.startswith("sdpa") else f"{impl} {variant}"] = vals
        panels.append(dict(title=f"{p} time (ms, log scale; lower is better)", groups=shapes, series=series,
                           ylabel="ms", log=True))
    if payload["modes"]:
        groups = [f"{m['variant']} {m['shape']}" for m in payload["modes"]]
        panels.append(dict(title="forward peak extra memory (MiB; lower is better)", groups=groups, log=True,
                           series={mode: [m.get(f"{mode}_mib") for m in payload["modes"]]
                                   for mode in ("chunked", "recurrent")}, ylabel="MiB"))
    if payload["scaling"]:
        sc = payload["scaling"]
        panels.append(dict(title="LION-s chunked, fixed B·T: time vs T (flat = linear in T)",
                           groups=[e["shape"] for e in sc], ylabel="ms",
                           series={p: [e.get(f"{p}_ms") for e in sc] for p in PASSES}))
    return hz.plot_bar_panels(path, hz.plot_title("LION: linflow vs SDPA vs naive", payload["env"]), panels)


if __name__ == "__main__":
    sys.exit(main())
