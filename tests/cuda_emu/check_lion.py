"""CPU check of the LION sweep kernels (csrc/lion/kernels.cuh) without a GPU: the real kernel source runs on the CUDA
emulation of tests/cuda_emu/shim (see check_chunk_bwd.py), driven by lion_main.cpp (one launch pair a call).
  forward:  sweep_kernel in forward mode -> o, against the float64 T x T form (tests/reference.py lion_ref);
  backward: the host pipeline of cuda_host.cpp's bwd_kernels transcribed in numpy (recompute launch -> G and g0;
            three gradient-mode launch pairs -> dv (+ q . k), dq (+ G . v + g0, q . (PF - PB)), dk and dg (the
            per-sequence reverse cumsum, in the kernel); dlam) against torch float64 autograd of lion_ref.
    python tests/cuda_emu/check_lion.py [--quick] [case ...]        (needs g++, numpy, torch)
--quick: the QUICK cases on a build with only the K, V <= 64 instantiation (the pytest; ~1 min on 2 free cores);
the full list takes several minutes. EMU_SKEW=1 EMU_SKEW_US=300 checks the barriers (slow: one small case).
"""
import numpy as np, os, subprocess, sys
import torch
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from reference import lion_ref  # noqa: E402
from emu_build import build, codec, run_cases  # noqa: E402

QUICK_BUILD = "--quick" in sys.argv
WORK, BIN = build("lion_main.cpp", "lion", defines=("LION_EMU_SMALL",) if QUICK_BUILD else ())
C = 64


def block_columns(V):
    return 64 if V <= 64 else 128


class Emu:
    """One launch pair of sweep_kernel on the emulator; arrays [tokens, H, *] (tokens packed for varlen)."""
    def __init__(self, name, f16, N, total, H, T_dense, cu, decay, g, lam):
        self.enc, self.dec = codec(f16)
        self.f16, self.N, self.total, self.H, self.T_dense, self.cu = f16, N, total, H, T_dense, cu
        self.decay, self.g, self.lam = decay, g, lam
        self.dir = os.path.join(WORK, name)
        self.n = 0

    def launch(self, q, k, v, gr, normalize=False, scale=1.0, eps=1e-6, rowx=None, want_diag=False, ea=None,
               eb=None, ext=False, dg_in=None):
        """-> (o, rowdot, diag, dg); dg_in = (rq, hv, qk): the last sweep forms dg (rowx given)"""
        d = os.path.join(self.dir, str(self.n)); self.n += 1
        os.makedirs(d, exist_ok=True)
        K, V = q.shape[-1], v.shape[-1]
        for nm, x in (("q", q), ("k", k), ("v", v)):
            np.ascontiguousarray(x, np.uint16).tofile(f"{d}/{nm}.bin")
        if self.decay == "selective":
            self.g.astype(np.float32).tofile(f"{d}/g.bin"); self.g.astype(np.float32).tofile(f"{d}/gb.bin")
        if self.decay == "fixed":
            np.log(self.lam).astype(np.float32).tofile(f"{d}/lam_log.bin")
        if self.cu is not None:
            np.asarray(self.cu, np.int64).tofile(f"{d}/cu.bin")
        if ea is not None: ea.astype(np.float32).tofile(f"{d}/ea.bin")
        if eb is not None: eb.astype(np.float32).tofile(f"{d}/eb.bin")
        if rowx is not None: np.ascontiguousarray(rowx, np.uint16).tofile(f"{d}/rowx.bin")
        if dg_in is not None:
            for nm, x in zip(("rq", "hv", "qk"), dg_in): x.astype(np.float32).tofile(f"{d}/{nm}.bin")
        dec = {"none": 0, "fixed": 1, "selective": 2}[self.decay]
        open(f"{d}/params.txt", "w").write(
            f"{self.N} {self.total} {self.H} {K} {V} {int(normalize)} {scale!r} {eps!r} {int(self.cu is not None)} "
            f"{self.T_dense} {dec} {int(ext)} {int(ea is not None)} {int(eb is not None)} {int(rowx is not None)} "
            f"{int(want_diag)} {int(dg_in is not None)} {block_columns(V)} 0\n")
        r = subprocess.run([BIN, d, "f16" if self.f16 else "bf16", str(int(gr))], capture_output=True, text=True)
        if r.returncode:
            print(r.stdout, r.stderr); raise SystemExit("emu failed")
        o = np.fromfile(f"{d}/o.out", np.uint16).reshape(self.total, self.H, V)
        return (o,) + tuple(np.fromfile(f"{d}/{nm}.out", np.float32).reshape(self.total, self.H)
                            for nm in ("rowdot", "diag", "dg"))


def err(name, what, o, rf, tol, floor=0.0):
    """max |o - ref| / max(max |ref|, floor): floor = the size of the terms when the reference cancels to ~0"""
    o, rf = np.asarray(o, np.float64), np.asarray(rf, np.float64)
    nan_o = int(np.isnan(o).sum())
    e = np.nanmax(np.abs(o - rf)) / (max(np.nanmax(np.abs(rf)), floor) + 1e-12)
    bad = nan_o > 0 or not (e <= tol)
    print(f"  {name:34s} {what:6s} rel-max-err {e:.2e}  nan {nan_o} {'FAIL' if bad else 'ok'}", flush=True)
    return not bad


def run(name, B, T, H, K, V, decay, normalize, cu=None, f16=False, seed=0, bwd=True):
    rng = np.random.default_rng(seed)
    enc, dec = codec(f16)
    varlen = cu is not None
    total = cu[-1] if varlen else B * T
    N = len(cu) - 1 if varlen else B
    # inputs [tokens, H, *]; normalised: non-negative features (the layer's feature maps), scale 1
    mk = lambda shape, s: rng.standard_normal(shape).astype(np.float32) * s  # noqa: E731
    q0, k0 = mk((total, H, K), 0.5), mk((total, H, K), 0.5)
    if normalize: q0, k0 = np.abs(q0) + 0.05, np.abs(k0) + 0.05
    qu, ku, vu, dou = enc(q0), enc(k0), enc(mk((total, H, V), 1.0)), enc(mk((total, H, V), 1.0))
    q, k, v, dO = dec(qu), dec(ku), dec(vu), dec(dou)
    g = (-rng.uniform(0.02, 0.6, (total, H))).astype(np.float32) if decay == "selective" else None
    lam = rng.uniform(0.7, 0.97, H).astype(np.float32) if decay == "fixed" else None
    scale = 1.0 if normalize else K ** -0.5
    eps = 1e-6
    emu = Emu(name, f16, N, total, H, T, cu, decay, g, lam)
    # reference: torch float64 autograd of lion_ref on the rounded inputs, [B, T, H, *]
    shp = (1, total) if varlen else (B, T)
    tt = lambda x: torch.tensor(np.asarray(x, np.float64).reshape(shp + x.shape[1:]), requires_grad=True)  # noqa
    tq, tk, tv = tt(q), tt(k), tt(v)
    tg = tt(g) if g is not None else None
    tl = torch.tensor(lam.astype(np.float64), requires_grad=True) if lam is not None else None
    ro = lion_ref(tq, tk, tv, tg, decay=decay, lam=tl, normalize=normalize, eps=eps, scale=scale,
                  cu_seqlens=torch.tensor(cu) if varlen else None)
    ok = True
    o_emu = dec(emu.launch(qu, ku, vu, gr=False, normalize=normalize, scale=scale, eps=eps)[0])
    ok &= err(name, "o", o_emu, ro.detach().numpy().reshape(total, H, V), 1e-2)
    if not bwd:
        return ok
    ins = [tq, tk, tv] + ([tg] if tg is not None else []) + ([tl] if tl is not None else [])
    grads = torch.autograd.grad(ro, ins, torch.tensor(dO.astype(np.float64).reshape(ro.shape)))
    ref = dict(dq=grads[0], dk=grads[1], dv=grads[2])
    if tg is not None: ref["dg"] = grads[3]
    if tl is not None: ref["dlam"] = grads[3]
    ref = {a: b.numpy().reshape((-1,) + tuple(b.shape[2:])) if a != "dlam" else b.numpy() for a, b in ref.items()}

    # --- the kernel pipeline (mirrors cuda_host.cpp bwd_kernels) ---
    gated = decay != "none"
    if normalize:  # the recompute launch writes G (16-bit, as o) and g0 (as rowdot)
        Gu, g0, _, _ = emu.launch(qu, ku, vu, gr=False, normalize=True, scale=scale, eps=eps, rowx=dou)
        gs = 1.0
    else:  # G = scale dO: dO with the sweeps' output scale
        Gu, g0, gs = dou, None, scale
    x = lambda a: a if gated else None  # noqa: E731
    dv, _, qk, _ = emu.launch(ku, qu, Gu, gr=True, scale=gs, want_diag=gated)
    dq, rq, hv, _ = emu.launch(Gu, vu, ku, gr=True, scale=gs, rowx=x(qu), want_diag=gated, ea=g0, ext=normalize)
    dk, rk, _, dg = emu.launch(vu, Gu, qu, gr=True, scale=gs, rowx=x(ku), eb=g0, ext=normalize,
                              dg_in=(rq, hv, qk) if gated else None)
    ok &= err(name, "dq", dec(dq), ref["dq"], 2e-2)
    ok &= err(name, "dk", dec(dk), ref["dk"], 2e-2)
    ok &= err(name, "dv", dec(dv), ref["dv"], 2e-2)
    if gated:
        floor = 0.1 * (np.abs(rq).max() + np.abs(rk).max())  # T = 1: dg = 0 exactly, the terms cancel
        if decay == "selective":
            ok &= err(name, "dg", dg, ref["dg"], 2e-2, floor)
        else:
            ok &= err(name, "dlam", dg.astype(np.float64).sum(0) / lam, ref["dlam"], 2e-2, floor)
    return ok


cases = {
    "fwd_sel_norm_T100_K64_V48": dict(B=1, T=100, H=1, K=64, V=48, decay="selective", normalize=True, bwd=False),
    "sel_norm_T100_K64_V48": dict(B=1, T=100, H=1, K=64, V=48, decay="selective", normalize=True),
    "sel_raw_T1_K32_V16": dict(B=2, T=1, H=1, K=32, V=16, decay="selective", normalize=False),
    "fixed_norm_T130_K40_V64_f16": dict(B=1, T=130, H=2, K=40, V=64, decay="fixed", normalize=True, f16=True),
    "none_raw_T70_K64_V96": dict(B=1, T=70, H=1, K=64, V=96, decay="none", normalize=False),
    "varlen_sel_raw_K128_V72": dict(B=1, T=0, H=1, K=128, V=72, decay="selective", normalize=False,
                                    cu=[0, 70, 75, 160]),
    "varlen_fixed_norm_K80_V128_f16": dict(B=1, T=0, H=1, K=80, V=128, decay="fixed", normalize=True, f16=True,
                                           cu=[0, 9, 140]),
    "sel_norm_T128_K128_V128": dict(B=1, T=128, H=1, K=128, V=128, decay="selective", normalize=True),
    "none_norm_T65_K16_V24_f16": dict(B=1, T=65, H=1, K=16, V=24, decay="none", normalize=True, f16=True),
}
QUICK = ["sel_norm_T100_K64_V48", "sel_raw_T1_K32_V16", "varlen_fixed_norm_K48_V32_f16", "none_raw_T70_K24_V40"]
cases.update({
    "varlen_fixed_norm_K48_V32_f16": dict(B=1, T=0, H=1, K=48, V=32, decay="fixed", normalize=True, f16=True,
                                          cu=[0, 9, 75, 100]),
    "none_raw_T70_K24_V40": dict(B=1, T=70, H=1, K=24, V=40, decay="none", normalize=False),
})
if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    run_cases(cases, run, args or (QUICK if QUICK_BUILD else list(cases)))
