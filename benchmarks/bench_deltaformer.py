#!/usr/bin/env python
"""Deltaformer: linflow beside fla's ``deltaformer_attn`` (the anchor) and causal softmax attention (issue #5).

    python benchmarks/bench_deltaformer.py                 # GPU, full run
    python benchmarks/bench_deltaformer.py --quick         # fewer repetitions
    python benchmarks/bench_deltaformer.py --shapes 8x4096 --skip-fla
    python benchmarks/bench_deltaformer.py --cpu-smoke     # tiny shapes on CPU: checks this script end to end

Rows: bf16, H=16, D=128, B8·T4096 and B2·T16384, fwd and fwd+bwd: linflow.deltaformer (beta = sigmoid(randn),
w = k by default) vs fla deltaformer_attn vs SDPA causal (cuDNN, flash). ms, ratios, % of the GEMM ceiling measured in
this process, peak memory of fwd+bwd, and the issue's goals. fla needs flash-attn; when it is missing a small stand-in
``flash_attn`` module built on torch SDPA is put in sys.modules (inside this script only) and the rows say so.
Benchmarks never assert: a failing row becomes a note. The summary tables print last.
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
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "python"))

import harness as hz  # noqa: E402
import bench_delta_rule as bdr  # noqa: E402  (Runner, import_linflow: reused)

SHAPES = {"B8-T4096": (8, 4096), "B2-T16384": (2, 16384)}
PASSES = bdr.PASSES
GOAL_VS_SDPA = 2.5  # fwd+bwd ≤ 2.5x SDPA causal
GOAL_MS = {"B8-T4096": 11.0}  # fwd+bwd ≤ 11 ms at B8 T4096
GOAL_VS_FLA = 6.0  # ≥ 6x faster than fla
VARIANT = "Deltaformer"
FLA_STANDIN_NOTE = "fla with SDPA standing in for flash-attn"


# --------------------------------------------------------------------------------------------- work and traffic
def deltaformer_fwd_flops(B: int, T: int, H: int, D: int) -> float:
    """Forward ≈ 2x causal attention (ALGORITHMS.md §3): the write pass (softmax(w k^T) over the causal past,
    applied to solve for u) costs about one causal attention, the read pass softmax(q k^T) u one more.
    The triangular solve of the write pass is O(T C D) per head and is left out."""
    return 2.0 * hz.attention_flops(B, T, H, D, causal=True, mode="fwd")


def deltaformer_flops(B: int, T: int, H: int, D: int, mode: str) -> float:
    """fwd, or fwd+bwd with the backward ≈ 2.5x the forward (the FlashAttention convention, as in harness)."""
    fwd = deltaformer_fwd_flops(B, T, H, D)
    return fwd if mode == "fwd" else 3.5 * fwd


def attn_bytes(q, k, v, mode: str, extra: tuple = ()) -> int:
    """Minimal traffic: fwd reads q, k, v (+ beta) and writes o; bwd reads them and do, writes one grad each."""
    ins = hz.nbytes(q, k, v, *extra)
    fwd = ins + hz.nbytes(q)
    return fwd if mode == "fwd" else fwd + ins + hz.nbytes(q) + ins


def make_inputs(B, T, H, D, *, device, dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)  # noqa: E731
    q, k, v = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D)
    beta = torch.randn(B, T, H, generator=gen, device=device).sigmoid().to(dtype)
    do = rnd(B, T, H, D)
    leaves = [t.requires_grad_(True) for t in (q, k, v, beta)]
    return q, k, v, beta, do, leaves


# --------------------------------------------------------------------------------------------- fla + stand-in
def _flash_attn_standin() -> types.ModuleType:
    """A ``flash_attn`` module with the two functions fla's deltaformer imports, on torch SDPA ([B, T, H, D] layout,
    causal, window (-1, -1) only; v is cast to q's dtype as flash-attn requires one dtype)."""
    def _sdpa(q, k, v, scale, causal):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.to(q.dtype).transpose(1, 2),
                                           is_causal=causal, scale=scale,
                                           enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
        if tuple(window_size) != (-1, -1) or dropout_p:
            raise NotImplementedError("flash-attn stand-in: window / dropout")
        return _sdpa(q, k, v, softmax_scale, causal)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                               dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
        if tuple(window_size) != (-1, -1) or dropout_p:
            raise NotImplementedError("flash-attn stand-in: window / dropout")
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = [_sdpa(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]], softmax_scale,
                      causal)[0] for i in range(len(cq) - 1)]
        return torch.cat(outs, 0)

    mod = types.ModuleType("flash_attn")
    mod.__linflow_standin__ = True
    mod.flash_attn_func, mod.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return mod


def import_fla(root: Path):
    """(deltaformer_attn or None, error or None, info). Only fla.ops.deltaformer is imported; the package __init__
    files (transformers, every op family) are skipped by entering bare namespace packages first."""
    info = {"root": str(root), "flash_attn": None}
    pkg = root / "fla"
    if not (pkg / "__init__.py").exists():
        return None, f"no fla package under {root}", info
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (pkg / "__init__.py").read_text())
    info["version"] = m.group(1) if m else None
    commit = root / "COMMIT"
    info["commit"] = commit.read_text().strip() if commit.exists() else None
    try:
        import flash_attn  # noqa: F401
        info["flash_attn"] = getattr(flash_attn, "__version__", "installed")
    except Exception:  # noqa: BLE001
        sys.modules["flash_attn"] = _flash_attn_standin()
        info["flash_attn"] = "stand-in (torch SDPA)"
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for name, sub in (("fla", pkg), ("fla.ops", pkg / "ops"), ("fla.modules", pkg / "modules"),
                      ("fla.layers", pkg / "layers")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(sub)]
            mod.__file__ = str(sub / "__init__.py")
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            mod.__spec__.submodule_search_locations = [str(sub)]
            mod.__version__ = info["version"] or "0"
            sys.modules[name] = mod
    try:
        return importlib.import_module("fla.ops.deltaformer").deltaformer_attn, None, info
    except Exception as exc:  # noqa: BLE001
        first = hz.short_error(exc)
    # fla.layers.utils (pad_input / unpad_input, used only with attention_mask, which this benchmark never passes)
    # needs einops; when it cannot be imported, stand in for it with functions that refuse, and retry once.
    for name in [n for n in sys.modules if n.startswith("fla.ops.deltaformer") or n == "fla.layers.utils"]:
        del sys.modules[name]
    utils = types.ModuleType("fla.layers.utils")

    def _refuse(*_a, **_k):
        raise NotImplementedError("fla.layers.utils stand-in: attention_mask is not benchmarked")

    utils.pad_input = utils.unpad_input = _refuse
    sys.modules["fla.layers.utils"] = utils
    try:
        fn = importlib.import_module("fla.ops.deltaformer").deltaformer_attn
        info["layers_utils"] = f"stand-in (first import failed: {first})"
        return fn, None, info
    except Exception as exc:  # noqa: BLE001
        return None, f"import: {first}; retry with fla.layers.utils stand-in: {hz.short_error(exc)}", info


# --------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help=f"comma list: BxT or names {', '.join(SHAPES)} (default: both)")
    p.add_argument("--skip-fla", action="store_true", help="no fla rows")
    p.add_argument("--skip-sdpa", action="store_true", help="no softmax attention rows")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=64, help="linflow chunk_size (16, 32, 64)")
    hz.add_common_args(p, "tiny shapes on CPU (checks the script; no fla)", fla_root=REPO / ".fla")
    args = p.parse_args(argv)
    hz.finish_common_args(args)
    if args.cpu_smoke:
        args.skip_fla = True
        args.heads, args.head_dim = 2, 32
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
    print(f"bench_deltaformer on {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"commit {env['git_commit']}", flush=True)

    lf, lf_note = bdr.import_linflow()
    if lf_note:
        notes.append(lf_note)
    fla_fn, fla_err, fla_info = None, None, {}
    if args.skip_fla:
        fla_err = "skipped (--skip-fla" + (", --cpu-smoke" if args.cpu_smoke else "") + ")"
    else:
        fla_fn, fla_err, fla_info = import_fla(Path(args.fla_root))
        print(f"fla {fla_info.get('version')}: deltaformer_attn {'imported' if fla_fn else fla_err}; "
              f"flash_attn {fla_info.get('flash_attn')}", flush=True)
    if fla_info.get("flash_attn") == "stand-in (torch SDPA)":
        notes.append(FLA_STANDIN_NOTE + " (flash_attn_func → torch scaled_dot_product_attention, default backend)")
    if fla_info.get("layers_utils"):
        notes.append(f"fla.layers.utils: {fla_info['layers_utils']}")
    if fla_err:
        notes.append(f"fla deltaformer_attn: {fla_err}")
    env["fla"] = fla_info

    smoke = args.cpu_smoke
    ceil = hz.measure_ceilings(device, copy_gib=0.0625 if smoke else (1.0 if args.quick else 2.0),
                               gemm_n=256 if smoke else 8192, dtype=dtype, warmup_ms=args.warmup_ms,
                               rep_ms=args.rep_ms)
    notes += ceil.notes
    print(f"ceilings: copy {ceil.copy_gbps or 0:.0f} GB/s, GEMM {ceil.gemm_tflops or 0:.1f} TFLOP/s "
          f"({ceil.gemm_dtype} {ceil.gemm_n}^3)", flush=True)

    run = bdr.Runner(args, device, ceil)
    interrupted = False
    fla_impl = "fla*" if fla_info.get("flash_attn") == "stand-in (torch SDPA)" else "fla"
    try:
        for shape, (B, T) in args.shape_map.items():
            q, k, v, beta, do, leaves = make_inputs(B, T, H, D, device=device, dtype=dtype)
            dims = dict(leaves=leaves, do=do)
            flops = lambda p, B=B, T=T: deltaformer_flops(B, T, H, D, p)  # noqa: E731
            bytes_ = lambda p, q=q, k=k, v=v, beta=beta: attn_bytes(q, k, v, p, (beta,))  # noqa: E731
            print(f"{shape}:", flush=True)
            if lf is None:
                run.train("linflow", VARIANT, shape, lambda: hz.raise_(lf_note), None, False, dims, False, flops,
                          bytes_)
            else:
                o = run.train("linflow", VARIANT, shape,
                              lambda: (lambda: lf.deltaformer(q, k, v, beta, chunk_size=C)), None, False, dims, False,
                              flops, bytes_, keep_output=False)
            if fla_fn is not None:
                # fla writes with w = q (ours times the paper's default w = k): compare outputs at fla's semantics
                ref = None
                if lf is not None:
                    with torch.no_grad():
                        ref = lf.deltaformer(q, k, v, beta, w=q, chunk_size=C)
                run.train(fla_impl, VARIANT, shape, lambda: (lambda: fla_fn(q, k, v, beta)), None, False, dims, True,
                          flops, bytes_, check_against=ref)
            else:
                run.rows += [dict(section="train", variant=VARIANT, shape=shape, impl="fla",
                                  note=f"refused/error: {fla_err}", **{"pass": p}) for p in PASSES]
            o = None
            del q, k, v, beta, do, leaves, dims
            hz.free_memory(device)

            if not args.skip_sdpa:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                backends = [("sdpa-math", SDPBackend.MATH)] if smoke else \
                    [("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)]
                gen = torch.Generator(device=device).manual_seed(2)
                aq, ak, av, ado = (torch.randn(B, H, T, D, generator=gen, device=device).to(dtype) for _ in range(4))
                aleaves = [t.requires_grad_(True) for t in (aq, ak, av)]
                for name, backend in backends:
                    def make(backend=backend, aq=aq, ak=ak, av=av):
                        def attn():
                            with sdpa_kernel([backend]):
                                return F.scaled_dot_product_attention(aq, ak, av, is_causal=True)
                        return attn
                    run.train(name, "causal softmax", shape, make, None, False, dict(leaves=aleaves, do=ado), True,
                              lambda p, B=B, T=T: hz.attention_flops(B, T, H, D, causal=True, mode=p),
                              lambda p, aq=aq, ak=ak, av=av: attn_bytes(aq, ak, av, p))
                del aq, ak, av, ado, aleaves
                hz.free_memory(device)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted (SIGTERM / Ctrl-C): the tables hold what was measured")

    if run.cuda_broken:
        notes.append(f"CUDA context broken, later rows skipped: {run.cuda_broken}")
    if run.deadline.expired():
        notes.append(f"time budget of {args.budget_s:.0f} s ran out: later rows skipped")
    payload = dict(env=env, args={k: v for k, v in vars(args).items() if k != "shape_map"}, shapes=args.shape_map,
                   heads=H, head_dim=D, chunk_size=C, dtype=str(dtype), ceilings=asdict(ceil), rows=run.rows,
                   checks={s: c for (_, s), c in run.checks.items()}, notes=notes, fla_impl=fla_impl,
                   goals=dict(vs_sdpa=GOAL_VS_SDPA, ms=GOAL_MS, vs_fla=GOAL_VS_FLA),
                   elapsed_s=time.monotonic() - t_start, interrupted=interrupted)
    payload["summary"] = summary_rows(payload)
    written = hz.save_results("deltaformer", payload, lambda path: plot(path, payload), args.results_dir)
    print_report(payload, ceil, written)
    return 0


# ------------------------------------------------------------------------------------------------------ report
def _row(rows, **match):
    return bdr._row(rows, **match)


def _yes(ok):
    return None if ok is None else ("yes" if ok else "NO")


def summary_rows(payload) -> list[dict]:
    rows, out, fla_impl = payload["rows"], [], payload["fla_impl"]
    for shape in payload["shapes"]:
        for p in PASSES:
            ours = _row(rows, impl="linflow", shape=shape, **{"pass": p})
            fla = _row(rows, impl=fla_impl, shape=shape, **{"pass": p}) or _row(rows, impl="fla", shape=shape,
                                                                                  **{"pass": p})
            s = dict(shape=shape, **{"pass": p}, ours_ms=ours.get("ms") if ours.get("ms") is not None else
                     (ours.get("note") or "").split(":")[0] or None)
            s["fla_ms"] = fla.get("ms")
            if s["fla_ms"] is None and fla.get("note"):
                s["fla_ms"] = fla["note"][:60]
            sd = {impl: _row(rows, impl=impl, shape=shape, **{"pass": p}).get("ms")
                  for impl in ("sdpa-cudnn", "sdpa-flash", "sdpa-math")}
            s.update({k: v for k, v in sd.items() if v is not None})
            best = min((v for v in sd.values() if v), default=None)
            o = ours.get("ms")
            if o:
                if sd.get("sdpa-cudnn"):
                    s["vs_cudnn"] = o / sd["sdpa-cudnn"]
                if sd.get("sdpa-flash"):
                    s["vs_flash"] = o / sd["sdpa-flash"]
                if best:
                    s["vs_sdpa"] = o / best
                if isinstance(s["fla_ms"], float):
                    s["fla_over_ours"] = s["fla_ms"] / o
            s["pct_gemm"], s["fla_pct_gemm"] = ours.get("pct_gemm"), fla.get("pct_gemm")
            s["ours_peak"], s["fla_peak"] = ours.get("peak_mib"), fla.get("peak_mib")
            s["check"] = fla.get("check")
            if p == "fwd+bwd":
                s["goal_sdpa"] = _yes(None if s.get("vs_sdpa") is None else s["vs_sdpa"] <= GOAL_VS_SDPA)
                if shape in GOAL_MS:
                    s["goal_ms"] = _yes(None if o is None else o <= GOAL_MS[shape])
                s["goal_fla"] = _yes(None if s.get("fla_over_ours") is None else s["fla_over_ours"] >= GOAL_VS_FLA)
            out.append(s)
    return out


def print_report(payload, ceil: hz.Ceilings, written) -> None:
    env, rows = payload["env"], payload["rows"]
    P = hz.print_block
    P("\n## Deltaformer: all rows (full notes below)")
    clip = lambda r: dict(r, note=r["note"][:60] + "…" if len(r.get("note") or "") > 61 else r.get("note"))  # noqa: E731
    P(hz.markdown_table([clip(r) for r in rows], [
        ("variant", "variant", ""), ("shape", "shape", ""), ("pass", "pass", ""), ("impl", "impl", ""),
        ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".1f"), ("pct_gemm", "%GEMM", ".1f"), ("gbps", "GB/s", ".0f"),
        ("peak_mib", "peak MiB", ".0f"), ("first_s", "1st call s", ".2f"), ("note", "note", "")]))
    P("\nfiles: " + ", ".join(written))
    row_notes = [f"{r['impl']} {r['shape']} {r['pass']}: {r['note']}" for r in rows
                 if r.get("note") and ": skipped" not in r["note"]]
    notes = list(dict.fromkeys(payload["notes"] + row_notes))
    if payload["fla_impl"] == "fla*":
        notes.insert(0, f"fla* = {FLA_STANDIN_NOTE}")
    if notes:
        P("\nnotes:")
        for n in notes:
            P(f"- {n}")
    P(f"\n# linflow deltaformer — {env['device']} — {env['date']} — torch {env['torch']}, triton {env['triton']}, "
      f"fla {env.get('fla', {}).get('version')} (flash_attn: {env.get('fla', {}).get('flash_attn')}), "
      f"commit {env['git_commit']}")
    P(f"ceilings: copy {ceil.copy_gbps or 0:.0f} GB/s, GEMM {ceil.gemm_tflops or 0:.1f} TFLOP/s "
      f"({ceil.gemm_dtype} {ceil.gemm_n}^3).  H={payload['heads']} D={payload['head_dim']} {payload['dtype']}, "
      f"linflow chunk {payload['chunk_size']}, beta=sigmoid(randn), w=k; FLOPs: Deltaformer = 2x causal attention, "
      f"bwd = 2.5x fwd; elapsed {payload['elapsed_s']:.0f} s")
    fla_label = "fla*" if payload["fla_impl"] == "fla*" else "fla"
    P(f"\n## Summary: ours/SDPA (best backend), {fla_label}/ours > 1 means linflow is faster; "
      f"goals (fwd+bwd): ≤{GOAL_VS_SDPA}x SDPA, ≤{GOAL_MS.get('B8-T4096')} ms at B8-T4096, ≥{GOAL_VS_FLA}x vs fla"
      + (f"; {fla_label} = {FLA_STANDIN_NOTE}" if fla_label == "fla*" else ""))
    summary = payload["summary"]
    cols = [("shape", "shape", ""), ("pass", "pass", ""), ("ours_ms", "ours ms", ".3f"),
            ("fla_ms", f"{fla_label} ms", ".3f")]
    for impl in ("sdpa-cudnn", "sdpa-flash", "sdpa-math"):
        if any(impl in s for s in summary):
            cols.append((impl, f"{impl} ms", ".3f"))
    cols += [("vs_cudnn", "ours/cudnn", ".2f"), ("vs_flash", "ours/flash", ".2f"), ("vs_sdpa", "ours/SDPA", ".2f"),
             ("fla_over_ours", f"{fla_label}/ours", ".2f"), ("pct_gemm", "ours %GEMM", ".1f"),
             ("fla_pct_gemm", f"{fla_label} %GEMM", ".1f"), ("ours_peak", "ours MiB", ".0f"),
             ("fla_peak", f"{fla_label} MiB", ".0f"), ("check", "Δo", ""),
             ("goal_sdpa", f"≤{GOAL_VS_SDPA}x SDPA", ""), ("goal_ms", "≤11 ms", ""),
             ("goal_fla", f"≥{GOAL_VS_FLA:g}x fla", "")]
    P(hz.markdown_table(summary, cols))


def plot(path: Path, payload) -> str | None:
    rows, shapes = payload["rows"], list(payload["shapes"])
    panels = []
    for p in PASSES:
        series = {}
        for impl in ("linflow", payload["fla_impl"], "sdpa-cudnn", "sdpa-flash", "sdpa-math"):
            vals = [_row(rows, impl=impl, shape=s, **{"pass": p}).get("ms") for s in shapes]
            if any(v is not None for v in vals):
                series[impl] = vals
        panels.append(dict(title=f"{p} time (ms, log scale; lower is better)", groups=shapes, series=series,
                           ylabel="ms", log=True))
    return hz.plot_bar_panels(path, hz.plot_title("Deltaformer: linflow vs fla vs SDPA causal", payload["env"]),
                              panels)


if __name__ == "__main__":
    sys.exit(main())
