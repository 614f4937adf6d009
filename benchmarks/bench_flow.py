#!/usr/bin/env python
"""Rank-R delta rule (flow_delta_rule: ParallelFlow / DeltaProduct): scans, ranks and fla, side by side (issue #3).

    python benchmarks/bench_flow.py                  # GPU, full run
    python benchmarks/bench_flow.py --quick          # fewer repetitions
    python benchmarks/bench_flow.py --skip-fla --sections a,c
    python benchmarks/bench_flow.py --cpu-smoke      # tiny shapes on CPU: checks this script end to end

bf16, K=V=128, q and k L2-normalised inside the op on every side (use_qk_l2norm / use_qk_l2norm_in_kernel):
  (a) long sequences, few heads (B1·H4·T262144, B1·H16·T65536), fwd and fwd+bwd, ungated, rank 1:
      flow_delta_rule(scan="parallel") vs scan="sequential" vs linflow.delta_rule vs fla chunk_delta_rule
      (goal: parallel ≥ 2.5× faster than fla). A row that runs out of memory becomes an "OOM" note.
  (b) product form, rank 1, 2, 4 at B8·T4096·H16, gated (g given, fla's DeltaProduct is gated), fwd and fwd+bwd:
      ours at rank R vs ours at rank 1 (goal: ≤ R×) and fla chunk_gated_delta_product (num_householder=R; known to
      refuse on Hopper with some Triton versions: its rows then say "refused: <reason>").
  (c) time vs T (B1·H4 or --sweep-BH, T 16K…256K or --sweep-T), parallel vs sequential scan, fwd and fwd+bwd: a log-log PNG and a
      "crossover" line (the smallest T at which parallel beats sequential) — this decides scan="auto".
ms / TFLOP/s / GB/s as % of the ceilings measured in this process, peak memory of fwd+bwd; JSON + PNG under
benchmarks/results/ and $OUT (flow.json/png: sections a, b; flow_scan.json/png: section c). Never asserts.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "python"))

import bench_delta_rule as bdr  # noqa: E402  (Runner, fla import, delta-rule FLOP count)
import harness as hz  # noqa: E402

PASSES = bdr.PASSES
A_SHAPES = {"B1-H4-T262144": (1, 4, 262144), "B1-H16-T65536": (1, 16, 65536)}
B_SHAPE = (8, 4096, 16)  # B, T, H
RANKS = (1, 2, 4)
C_TS = (16384, 32768, 65536, 131072, 262144)
C_BH = (1, 4)
FLA_GOAL = 2.5  # (a): fla / ours(parallel) ≥ 2.5
FLOW_CHUNK = 64  # flow_delta_rule's chunk (not a parameter of the op)
FLA_OPS = {"chunk_delta_rule": "fla.ops.delta_rule",
           "chunk_gated_delta_product": "fla.ops.gated_delta_product"}


# --------------------------------------------------------------------------------------------- work and traffic
def scan_fwd_flops(B: int, T: int, R: int, H: int, K: int, V: int, C: int = FLOW_CHUNK) -> float:
    """Extra forward work of scan="parallel" (the segment scan, linflow/ops/scan.py) over the sequential loop, per
    sequence and head: one more pass of the chunk form over every token with K + V value columns (the segments'
    affine maps from [I | 0] on [0 | v]), i.e. the delta rule's count with V -> K + V; the scan over segments
    (a few K x K by K x V products a segment) is negligible."""
    return bdr.delta_rule_fwd_flops(B, T * R, H, K, K + V, C)


def flow_flops(B: int, T: int, R: int, H: int, K: int, V: int, mode: str, scan: str = "sequential",
               C: int = FLOW_CHUNK) -> float:
    """Rank-R chunk form: the delta rule's per-token count (bench_delta_rule.delta_rule_fwd_flops, ALGORITHMS.md
    §1) on the interleaved length-T·R sequence, i.e. ≈ R × the rank-1 count; plus scan_fwd_flops for the parallel
    scan. fwd+bwd = 3.5 × fwd (the backward ≈ 2.5 × the forward; its reverse scan mirrors the forward one)."""
    fwd = bdr.delta_rule_fwd_flops(B, T * R, H, K, V, C)
    if scan == "parallel":
        fwd += scan_fwd_flops(B, T, R, H, K, V, C)
    return fwd if mode == "fwd" else 3.5 * fwd


def flow_bytes(x: "FlowInputs", gated: bool, mode: str) -> int:
    """Minimal HBM traffic, as bench_delta_rule.delta_rule_bytes: fwd reads q, k, v, beta (, g) and writes o;
    fwd+bwd adds a backward reading the inputs and do and writing one gradient per input."""
    ins = hz.nbytes(x.q, x.k, x.v, x.beta, x.g if gated else None)
    fwd = ins + hz.nbytes(x.do)
    return fwd if mode == "fwd" else fwd + ins + hz.nbytes(x.do) + ins


# ------------------------------------------------------------------------------------------------------ inputs
class FlowInputs:
    """q [B,T,H,K]; k [B,T,R,H,K]; v [B,T,R,H,V]; beta [B,T,R,H] (sigmoid, q's dtype); g [B,T,H] (logsigmoid,
    fp32); do [B,T,H,V]. The leaves get gradients."""

    def __init__(self, B, T, R, H, K, V, *, device, dtype, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
        self.R = R
        self.q, self.k, self.v = rnd(B, T, H, K), rnd(B, T, R, H, K), rnd(B, T, R, H, V)
        self.beta = torch.rand(B, T, R, H, generator=gen, device=device).sigmoid().to(dtype)
        self.g = F.logsigmoid(torch.rand(B, T, H, generator=gen, device=device))
        self.do = rnd(B, T, H, V)
        for t in self.leaves(True):
            t.requires_grad_(True)

    def leaves(self, gated: bool) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, self.beta] + ([self.g] if gated else [])

    def flat(self):
        """k, v, beta as one length-T·R sequence (token-major, its R sub-steps in order): fla's DeltaProduct layout
        and, at R = 1, the delta rule's."""
        B, T, R, H = self.beta.shape
        return (self.k.reshape(B, T * R, H, -1), self.v.reshape(B, T * R, H, -1), self.beta.reshape(B, T * R, H))


def ours_flow(lf, x: FlowInputs, gated: bool, scan: str, form: str = "product"):
    g = x.g if gated else None
    return lambda: lf.flow_delta_rule(x.q, x.k, x.v, x.beta, g, form=form, use_qk_l2norm=True, scan=scan)[0]


def ours_delta_rule(lf, x: FlowInputs, gated: bool):
    g = x.g if gated else None
    return lambda: lf.delta_rule(x.q, *x.flat(), g, use_qk_l2norm=True)[0]


def fla_delta_rule(fla: dict, x: FlowInputs):
    f = fla["chunk_delta_rule"]

    def call():
        k, v, beta = x.flat()
        return f(q=x.q, k=k, v=v, beta=beta, use_qk_l2norm_in_kernel=True)[0]
    return call


def fla_delta_product(fla: dict, x: FlowInputs):
    f = fla["chunk_gated_delta_product"]

    def call():
        k, v, beta = x.flat()
        return f(q=x.q, k=k, v=v, g=x.g, beta=beta, num_householder=x.R, use_qk_l2norm_in_kernel=True)[0]
    return call


def import_fla(root: Path):
    """bench_delta_rule.import_fla (bare namespace packages, op modules only) on this benchmark's op list."""
    saved = bdr.FLA_OPS
    bdr.FLA_OPS = FLA_OPS
    try:
        return bdr.import_fla(root)
    finally:
        bdr.FLA_OPS = saved


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="a,b,c", help="comma list of a, b, c (default: all)")
    p.add_argument("--skip-fla", action="store_true", help="no fla rows")
    p.add_argument("--skip-bwd-sweep", action="store_true", help="section c: forward only")
    p.add_argument("--rank-scan", choices=("sequential", "parallel"), default="sequential",
                   help="scan of the section-b rows (B8·H16 fills the GPU: sequential by default)")
    p.add_argument("--sweep-T", default=None, help="section c: comma list of T (default 16384,…,262144)")
    p.add_argument("--sweep-BH", default=None, help="section c: batch and heads as BxH (default 1x4)")
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    hz.add_common_args(p, "tiny shapes on CPU (checks the script; no fla)", fla_root=REPO / ".fla")
    args = p.parse_args(argv)
    hz.finish_common_args(args)
    args.sections = {s.strip().lower() for s in args.sections.split(",") if s.strip()}
    args.a_shapes, args.b_shape, args.c_ts, args.c_bh = dict(A_SHAPES), B_SHAPE, C_TS, C_BH
    if args.cpu_smoke:
        args.skip_fla = True
        args.head_dim = 32
        args.a_shapes = {"B1-H2-T256": (1, 2, 256)}
        args.b_shape, args.c_ts, args.c_bh = (2, 128, 2), (64, 128, 256), (1, 2)
    if args.sweep_T:
        args.c_ts = tuple(int(t) for t in args.sweep_T.split(",") if t.strip())
    if args.sweep_BH:
        args.c_bh = tuple(int(x) for x in args.sweep_BH.lower().split("x"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, hz.interrupt)
    if (picked := hz.pick_device(args)) is None:
        return 2
    device, dtype = picked
    D = args.head_dim
    env = hz.environment(device)
    notes: list[str] = []
    t_start = time.monotonic()
    print(f"bench_flow on {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['git_commit']}",
          flush=True)
    lf, lf_note = bdr.import_linflow()
    if lf_note:
        notes.append(lf_note)
    fla, fla_errors, fla_info = {}, {}, {}
    if args.skip_fla:
        fla_errors = {n: "skipped (--skip-fla" + (", --cpu-smoke" if args.cpu_smoke else "") + ")" for n in FLA_OPS}
    else:
        fla, fla_errors, fla_info = import_fla(Path(args.fla_root))
        print(f"fla {fla_info.get('version')} ({fla_info.get('import')}): {sorted(fla) or 'nothing imported'}",
              flush=True)
    env["fla"] = fla_info
    notes += [f"fla {n}: {e}" for n, e in fla_errors.items()]

    smoke = args.cpu_smoke
    ceil = hz.measure_ceilings(device, copy_gib=0.0625 if smoke else (1.0 if args.quick else 2.0),
                               gemm_n=256 if smoke else 8192, dtype=dtype, warmup_ms=args.warmup_ms,
                               rep_ms=args.rep_ms)
    notes += ceil.notes
    print(f"ceilings: copy {ceil.copy_gbps or 0:.0f} GB/s (read+write), GEMM {ceil.gemm_tflops or 0:.1f} TFLOP/s "
          f"({ceil.gemm_dtype} {ceil.gemm_n}^3)", flush=True)
    run = bdr.Runner(args, device, ceil)

    def rows_for(impl, variant, shape, make, x, gated, refusable, flops, nbytes, passes=PASSES):
        """Runner.train on FlowInputs; variant carries the section. Passes not wanted are dropped afterwards."""
        n0 = len(run.rows)
        if x is None or (lf is None and impl.startswith(("ours", "linflow"))):
            why = lf_note if x is not None else "inputs could not be built"
            run.rows += [dict(section="train", variant=variant, shape=shape, impl=impl, note=f"error: {why}",
                              **{"pass": p}) for p in passes]
            return
        run.train(impl, variant, shape, make, None, gated, dict(leaves=x.leaves(gated), do=x.do), refusable,
                  flops, nbytes)
        run.rows[n0:] = [r for r in run.rows[n0:] if r["pass"] in passes]

    def inputs(B, T, R, H):
        try:
            return FlowInputs(B, T, R, H, D, D, device=device, dtype=dtype), None
        except Exception as exc:  # noqa: BLE001  (OOM at allocation: the rows say so)
            hz.free_memory(device)
            return None, run.failure(exc, False)

    def fla_rows(op, variant, shape, make, x, gated, flops, nbytes):
        if op not in fla:
            run.rows += [dict(section="train", variant=variant, shape=shape, impl="fla",
                              note=f"fla: {fla_errors.get(op, 'missing')}", **{"pass": p}) for p in PASSES]
            return
        rows_for("fla", variant, shape, make, x, gated, True, flops, nbytes)

    interrupted = False
    try:
        # (a) long sequences, few heads: scans vs the delta rule vs fla (ungated, rank 1)
        if "a" in args.sections:
            print("(a) long sequences, rank 1:", flush=True)
            for shape, (B, H, T) in args.a_shapes.items():
                x, err = inputs(B, T, 1, H)
                if err:
                    notes.append(f"(a) {shape}: inputs: {err}")
                fl = lambda p, B=B, T=T, H=H, s="sequential": flow_flops(B, T, 1, H, D, D, p, s)  # noqa: E731
                flp = lambda p, B=B, T=T, H=H: flow_flops(B, T, 1, H, D, D, p, "parallel")  # noqa: E731
                by = lambda p, x=x: flow_bytes(x, False, p)  # noqa: E731
                rows_for("ours-par", "a", shape, lambda: ours_flow(lf, x, False, "parallel"), x, False, False, flp, by)
                rows_for("ours-seq", "a", shape, lambda: ours_flow(lf, x, False, "sequential"), x, False, False, fl,
                         by)
                rows_for("delta_rule", "a", shape, lambda: ours_delta_rule(lf, x, False), x, False, False, fl, by)
                fla_rows("chunk_delta_rule", "a", shape, lambda: fla_delta_rule(fla, x), x, False, fl, by)
                del x
                hz.free_memory(device)

        # (b) product form rank 1, 2, 4 (gated) vs our rank 1 and fla's DeltaProduct
        if "b" in args.sections:
            B, T, H = args.b_shape
            shape = f"B{B}-H{H}-T{T}"
            print(f"(b) product form ranks, {shape}, scan={args.rank_scan}:", flush=True)
            # ours at every rank first, then fla (its first call compiles and autotunes for tens of seconds)
            for who in ("ours", "fla"):
                for R in RANKS:
                    x, err = inputs(B, T, R, H)
                    if err and who == "ours":
                        notes.append(f"(b) R={R}: inputs: {err}")
                    fl = lambda p, R=R: flow_flops(B, T, R, H, D, D, p, args.rank_scan)  # noqa: E731
                    by = lambda p, x=x: flow_bytes(x, True, p)  # noqa: E731
                    if who == "ours":
                        rows_for(f"ours R={R}", "b", shape, lambda: ours_flow(lf, x, True, args.rank_scan), x, True,
                                 False, fl, by)
                    else:
                        fla_rows("chunk_gated_delta_product", "b", shape, lambda: fla_delta_product(fla, x), x, True,
                                 fl, by)
                    for r in run.rows:
                        if r["variant"] == "b" and r["impl"] == "fla" and "rank" not in r:
                            r["rank"], r["impl"] = R, f"fla R={R}"
                        if r["variant"] == "b" and r["impl"] == f"ours R={R}":
                            r["rank"] = R
                    del x
                    hz.free_memory(device)

        # (c) time vs T, parallel vs sequential scan
        if "c" in args.sections:
            B, H = args.c_bh
            passes = ("fwd",) if args.skip_bwd_sweep else PASSES
            print(f"(c) scan sweep, B{B} H{H}:", flush=True)
            for T in args.c_ts:
                x, err = inputs(B, T, 1, H)
                if err:
                    notes.append(f"(c) T={T}: inputs: {err}")
                by = lambda p, x=x: flow_bytes(x, False, p)  # noqa: E731
                for scan in ("parallel", "sequential"):
                    fl = lambda p, T=T, scan=scan: flow_flops(B, T, 1, H, D, D, p, scan)  # noqa: E731
                    rows_for(scan, "c", f"T{T}", lambda scan=scan: ours_flow(lf, x, False, scan), x, False, False,
                             fl, by, passes)
                for r in run.rows:
                    if r["variant"] == "c" and r["shape"] == f"T{T}":
                        r["T"] = T
                del x
                hz.free_memory(device)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted (SIGTERM / Ctrl-C): the tables hold what was measured")

    if run.cuda_broken:
        notes.append(f"CUDA context broken, later rows skipped: {run.cuda_broken}")
    if run.deadline.expired():
        notes.append(f"time budget of {args.budget_s:.0f} s ran out: later rows skipped")
    for r in run.rows:
        r["section"] = r.pop("variant")
    payload = dict(env=env, args={k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
                   head_dim=D, dtype=str(dtype), chunk_size=FLOW_CHUNK, ceilings=asdict(ceil), rows=run.rows,
                   notes=notes, elapsed_s=time.monotonic() - t_start, interrupted=interrupted)
    payload["a_summary"] = summary_a(run.rows)
    payload["b_summary"] = summary_b(run.rows)
    payload["c_sweep"], payload["crossover"] = sweep_c(run.rows)
    written = hz.save_results("flow", payload, lambda path: plot_ab(path, payload), args.results_dir)
    written += hz.save_results("flow_scan", dict(payload, rows=[r for r in run.rows if r["section"] == "c"]),
                               lambda path: plot_c(path, payload), args.results_dir)
    print_report(payload, ceil, written)
    return 0


# ------------------------------------------------------------------------------------------------------ report
def _row(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return {}


def _ms_or_note(r: dict):
    if r.get("ms") is not None:
        return r["ms"]
    note = (r.get("note") or "—") if r else "—"
    note = note[5:] if note.startswith("fla: ") else note
    return note.split(":")[0].split(" (")[0]  # refused / error / OOM / skipped / import


def _ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def summary_a(rows) -> list[dict]:
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows if r["section"] == "a"):
        for p in PASSES:
            get = lambda impl: _row(rows, section="a", shape=shape, impl=impl, **{"pass": p})  # noqa: E731
            s = dict(shape=shape, **{"pass": p})
            for key, impl in (("par", "ours-par"), ("seq", "ours-seq"), ("dr", "delta_rule"), ("fla", "fla")):
                s[key] = _ms_or_note(get(impl))
            s["fla_over_par"] = _ratio(s["fla"], s["par"])
            s["seq_over_par"] = _ratio(s["seq"], s["par"])
            s["dr_over_par"] = _ratio(s["dr"], s["par"])
            s["goal"] = None if s["fla_over_par"] is None else ("yes" if s["fla_over_par"] >= FLA_GOAL else "NO")
            s["par_peak"], s["fla_peak"] = get("ours-par").get("peak_mib"), get("fla").get("peak_mib")
            s["pct_gemm"] = get("ours-par").get("pct_gemm")
            out.append(s)
    return out


def summary_b(rows) -> list[dict]:
    out = []
    for p in PASSES:
        base = _row(rows, section="b", impl="ours R=1", **{"pass": p}).get("ms")
        for R in RANKS:
            ours = _row(rows, section="b", impl=f"ours R={R}", **{"pass": p})
            if not ours:
                continue
            fla = _row(rows, section="b", impl=f"fla R={R}", **{"pass": p})
            s = dict(rank=R, shape=ours["shape"], **{"pass": p}, ours=_ms_or_note(ours), fla=_ms_or_note(fla))
            s["over_r1"] = _ratio(s["ours"], base)
            s["goal"] = None if s["over_r1"] is None else ("yes" if s["over_r1"] <= R else "NO")
            s["fla_over_ours"] = _ratio(s["fla"], s["ours"])
            s["pct_gemm"], s["peak"] = ours.get("pct_gemm"), ours.get("peak_mib")
            s["fla_note"] = fla.get("note") if fla.get("ms") is None else None
            out.append(s)
    return out


def sweep_c(rows) -> tuple[list[dict], dict]:
    out, cross = [], {}
    ts = sorted({r["T"] for r in rows if r["section"] == "c" and "T" in r})
    for p in PASSES:
        found = None
        for T in ts:
            par = _row(rows, section="c", T=T, impl="parallel", **{"pass": p})
            seq = _row(rows, section="c", T=T, impl="sequential", **{"pass": p})
            if not par and not seq:
                continue
            s = dict(T=T, **{"pass": p}, par=_ms_or_note(par), seq=_ms_or_note(seq))
            s["seq_over_par"] = _ratio(s["seq"], s["par"])
            if found is None and s["seq_over_par"] is not None and s["seq_over_par"] > 1:
                found = T
            out.append(s)
        if any(s["pass"] == p for s in out):
            cross[p] = found
    return out, cross


def print_report(payload, ceil: hz.Ceilings, written) -> None:
    env, rows = payload["env"], payload["rows"]
    P = hz.print_block
    P("\n## Flow: all rows (full notes below the table)")
    clip = lambda r: dict(r, note=r["note"][:60] + "…" if len(r.get("note") or "") > 61 else r.get("note"))  # noqa: E731
    P(hz.markdown_table([clip(r) for r in rows], [
        ("section", "sec", ""), ("shape", "shape", ""), ("pass", "pass", ""), ("impl", "impl", ""),
        ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".2f"), ("pct_gemm", "%GEMM", ".1f"), ("gbps", "GB/s", ".0f"),
        ("pct_copy", "%copy", ".1f"), ("peak_mib", "peak MiB", ".0f"), ("first_s", "1st call s", ".2f"),
        ("note", "note", "")]))
    P("\nfiles: " + ", ".join(written))
    row_notes = [f"({r['section']}) {r['impl']} {r['shape']} {r['pass']}: {r['note']}" for r in rows if r.get("note")]
    notes = list(dict.fromkeys(payload["notes"] + [n for n in row_notes if ": skipped" not in n]))
    if notes:
        P("\nnotes:")
        for n in notes:
            P(f"- {n}")
    P(f"\n# linflow flow_delta_rule — {env['device']} — {env['date']} — torch {env['torch']}, triton {env['triton']}, "
      f"fla {env.get('fla', {}).get('version')}, commit {env['git_commit']}")
    P(f"ceilings: copy {ceil.copy_gbps or 0:.0f} GB/s (read+write), GEMM {ceil.gemm_tflops or 0:.1f} TFLOP/s "
      f"({ceil.gemm_dtype} {ceil.gemm_n}^3).  K=V={payload['head_dim']} {payload['dtype']} chunk "
      f"{payload['chunk_size']}, q/k l2norm in op (all sides); elapsed {payload['elapsed_s']:.0f} s.  FLOPs: "
      f"R × delta-rule count on T·R tokens (+ parallel scan: one more pass with K+V value columns, the segment maps); "
      f"bwd = 2.5 × fwd")
    if payload["c_sweep"]:
        P("\n## (c) Scan sweep: time vs T (seq/par > 1: parallel faster)")
        P(hz.markdown_table(payload["c_sweep"], [("T", "T", ""), ("pass", "pass", ""), ("par", "parallel ms", ".3f"),
                                                 ("seq", "sequential ms", ".3f"), ("seq_over_par", "seq/par", ".2f")]))
        for p, T in payload["crossover"].items():
            P(f"crossover ({p}): " + (f"parallel beats sequential from T={T}" if T else
                                      "none: sequential is as fast or faster at every measured T"))
    if payload["b_summary"]:
        P("\n## (b) Product form rank R, gated (goal: ours R / ours R=1 ≤ R; fla/ours > 1: linflow faster)")
        P(hz.markdown_table(payload["b_summary"], [
            ("shape", "shape", ""), ("pass", "pass", ""), ("rank", "R", ""), ("ours", "ours ms", ".3f"),
            ("over_r1", "ours/R=1", ".2f"), ("goal", "≤R", ""), ("fla", "fla ms", ".3f"),
            ("fla_over_ours", "fla/ours", ".2f"), ("pct_gemm", "ours %GEMM", ".1f"), ("peak", "ours MiB", ".0f")]))
        for s in payload["b_summary"]:
            if s.get("fla_note") and "skipped" not in s["fla_note"]:
                P(f"- fla R={s['rank']} {s['pass']}: {s['fla_note']}")
    if payload["a_summary"]:
        P(f"\n## (a) Summary, rank 1, ungated (goal: fla / ours-parallel ≥ {FLA_GOAL}; x/par > 1: parallel faster)")
        P(hz.markdown_table(payload["a_summary"], [
            ("shape", "shape", ""), ("pass", "pass", ""), ("par", "par ms", ".3f"), ("seq", "seq ms", ".3f"),
            ("dr", "delta_rule ms", ".3f"), ("fla", "fla ms", ".3f"), ("fla_over_par", "fla/par", ".2f"),
            ("goal", f"≥{FLA_GOAL}", ""), ("seq_over_par", "seq/par", ".2f"), ("dr_over_par", "dr/par", ".2f"),
            ("pct_gemm", "par %GEMM", ".1f"), ("par_peak", "par MiB", ".0f"), ("fla_peak", "fla MiB", ".0f")]))


def plot_ab(path: Path, payload) -> str | None:
    rows, panels = payload["rows"], []
    a_shapes = list(dict.fromkeys(r["shape"] for r in rows if r["section"] == "a"))
    for p in PASSES:
        series = {impl: [_row(rows, section="a", shape=s, impl=impl, **{"pass": p}).get("ms") for s in a_shapes]
                  for impl in ("ours-par", "ours-seq", "delta_rule", "fla")}
        panels.append(dict(title=f"(a) rank 1, {p} (ms, log; lower is better)", groups=a_shapes, series=series,
                           ylabel="ms", log=True))
    groups = [p for p in PASSES if any(r["section"] == "b" for r in rows)]
    series = {f"{who} R={R}": [_row(rows, section="b", impl=f"{who} R={R}", **{"pass": p}).get("ms") for p in groups]
              for who in ("ours", "fla") for R in RANKS}
    panels.append(dict(title="(b) product form by rank (ms; lower is better)", groups=groups, series=series,
                       ylabel="ms", log=True))
    return hz.plot_bar_panels(path, hz.plot_title("Flow delta rule: scans, ranks, fla", payload["env"]), panels)


def plot_c(path: Path, payload) -> str | None:
    """Log-log time vs T, one line per (scan, pass), the crossover marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"no PNG: matplotlib unavailable ({hz.short_error(exc, 80)})"
    sweep = payload["c_sweep"]
    if not any(isinstance(s.get(k), float) for s in sweep for k in ("par", "seq")):
        return "no PNG (scan sweep): nothing measured"
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, p in enumerate(PASSES):
        for key, label, style in (("par", "parallel", "-o"), ("seq", "sequential", "--s")):
            pts = [(s["T"], s[key]) for s in sweep if s["pass"] == p and isinstance(s.get(key), float)]
            if pts:
                ax.plot([t for t, _ in pts], [m for _, m in pts], style, color=f"C{i}", label=f"{label} {p}")
        T = payload["crossover"].get(p)
        if T:
            ax.axvline(T, color=f"C{i}", alpha=0.3, lw=3, label=f"crossover {p}: T={T}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("ms")
    B, H = payload["args"]["c_bh"]
    ax.set_title(hz.plot_title(f"flow_delta_rule scan: time vs T (B{B} H{H}, K=V={payload['head_dim']})",
                               payload["env"]), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


if __name__ == "__main__":
    sys.exit(main())
