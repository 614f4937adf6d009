"""CPU check of the Deltaformer write-pass backward kernels (csrc/deltaformer/write_bwd_kernel.cuh) without a GPU:
the real kernel source runs on the CUDA emulation of tests/cuda_emu/shim (see check_chunk_bwd.py), on random
inputs (k, w, v, beta -> P, lse, u, r = P u in float64; du random), against a float64 numpy transcription of
write_backward (chunk_aten.cpp) on the whole matrices:
    dV = (I + diag(beta) P)^-T dU, dbeta = -dV.R, dA = P o (-diag(beta) dV U^T - beta dbeta), dW = s dA K,
    dK = s dA^T W.
    python tests/cuda_emu/check_deltaformer_write_bwd.py [case ...]      (EMU_SKEW=1 / 2: skewed warps)
"""
import numpy as np, os, subprocess, sys
from emu_build import build, codec, run_cases, seq_layout
WORK, BIN = build("write_bwd_main.cpp", "write_bwd")
RUNS = os.path.join(WORK, "runs")
C = 64

def run(name, B, T, H, K, V, beta=True, w=True, cu=None, seed=0, f16=False, bscale=0.9):
    enc, dec = codec(f16)
    rng = np.random.default_rng(seed)
    varlen, total, N, slots, seqs = seq_layout(B, T, cu, C)
    scale = K ** -0.5
    d = os.path.join(RUNS, name); os.makedirs(d, exist_ok=True)
    def mk(shape, s=1.0):
        u = enc(rng.standard_normal(shape).astype(np.float32) * s)
        return u, dec(u).astype(np.float64)
    ku, k = mk((total, H, K)); ku.tofile(f"{d}/k.bin")
    if w:
        wu, wf = mk((total, H, K)); wu.tofile(f"{d}/w.bin")
    else:
        wf = k
    v = rng.standard_normal((total, H, V))
    be = rng.uniform(0.1, bscale, (total, H)).astype(np.float32)
    if beta: be.tofile(f"{d}/beta.bin")
    be = be.astype(np.float64) if beta else np.ones((total, H))
    du = rng.standard_normal((total, H, V)).astype(np.float32)
    du.tofile(f"{d}/du.bin")
    du = du.astype(np.float64)
    u = np.zeros((total, H, V)); r = np.zeros((total, H, V)); lse = np.zeros((total, H))
    ref = dict(dv=np.zeros((total, H, V)), dbeta=np.zeros((total, H)), dw=np.zeros((total, H, K)),
               dk=np.zeros((total, H, K)))
    for bos, ln in seqs:
        if ln == 0: continue
        sl = slice(bos, bos + ln)
        for hh in range(H):
            W, Kh, b = wf[sl, hh], k[sl, hh], be[sl, hh]
            S = scale * W @ Kh.T
            mask = np.tril(np.ones((ln, ln), bool), -1)
            Sm = np.where(mask, S, -np.inf)
            m = Sm.max(1, initial=-np.inf); m = np.where(np.isinf(m), 0, m)
            e = np.where(mask, np.exp(S - m[:, None]), 0)
            l = e.sum(1)
            ls = np.where(l > 0, m + np.log(np.where(l > 0, l, 1)), 0)
            P = np.where(mask, np.exp(S - ls[:, None]), 0)
            Msys = np.eye(ln) + b[:, None] * P
            U = np.linalg.solve(Msys, v[sl, hh]); R = P @ U
            u[sl, hh] = U; r[sl, hh] = R; lse[sl, hh] = ls
    u16 = enc(u.astype(np.float32)); u16.tofile(f"{d}/u16.bin")
    r.astype(np.float32).tofile(f"{d}/r.bin"); lse.astype(np.float32).tofile(f"{d}/lse.bin")
    lse32 = lse.astype(np.float32).astype(np.float64); r32 = r.astype(np.float32).astype(np.float64)
    for bos, ln in seqs:
        if ln == 0: continue
        sl = slice(bos, bos + ln)
        for hh in range(H):
            W, Kh, b = wf[sl, hh], k[sl, hh], be[sl, hh]
            mask = np.tril(np.ones((ln, ln), bool), -1)
            P = np.where(mask, np.exp(scale * W @ Kh.T - lse32[sl, hh][:, None]), 0)
            Msys = np.eye(ln) + b[:, None] * P
            dV = np.linalg.solve(Msys.T, du[sl, hh])
            db = -(dV * r32[sl, hh]).sum(1)
            dP = -b[:, None] * (dV @ u[sl, hh].T)
            dA = P * (dP - (b * db)[:, None])
            ref["dv"][sl, hh] = dV; ref["dbeta"][sl, hh] = db
            ref["dw"][sl, hh] = scale * dA @ Kh; ref["dk"][sl, hh] = scale * dA.T @ W
    if varlen: np.asarray(cu, np.int64).tofile(f"{d}/cu.bin")
    open(f"{d}/params.txt", "w").write(
        f"{T if not varlen else total} {H} {K} {V} {N} {int(varlen)} {int(beta)} {int(w)} {scale!r} {slots} {total}\n")
    rr = subprocess.run([BIN, d, "f16" if f16 else "bf16"], capture_output=True, text=True)
    if rr.returncode: print(rr.stdout, rr.stderr); raise SystemExit(f"{name}: emu failed")
    out = dict(dv=np.fromfile(f"{d}/dv.out", np.float32).reshape(total, H, V),
               dbeta=np.fromfile(f"{d}/dbeta.out", np.float32).reshape(total, H),
               dw=np.fromfile(f"{d}/dw.out", np.float32).reshape(total, H, K),
               dk=np.fromfile(f"{d}/dk.out", np.float32).reshape(total, H, K))
    covered = np.zeros(total, bool)
    for bos, ln in seqs: covered[bos:bos + ln] = True
    ok = True
    for k_ in out:
        o, rf = out[k_][covered].astype(np.float64), ref[k_][covered]
        nan_o = np.isnan(o).sum()
        err = np.max(np.abs(o - rf)) / (np.max(np.abs(rf)) + 1e-12) if o.size else 0.0
        bad = nan_o > 0 or not err <= 2e-2
        ok &= not bad
        print(f"  {name:30s} {k_:6s} rel-max-err {err:.2e}  nan(out) {nan_o} {'FAIL' if bad else 'ok'}")
    return ok

cases = {
  "dense_K64_V64_T130": dict(B=1, T=130, H=1, K=64, V=64),
  "dense_K128_V32_T100_B2_nobeta": dict(B=2, T=100, H=1, K=128, V=32, beta=False, bscale=1.0),
  "dense_K32_V128_T70_now_f16": dict(B=1, T=70, H=2, K=32, V=128, w=False, f16=True),
  "dense_T1": dict(B=1, T=1, H=1, K=64, V=32),
  "varlen_K64_V32": dict(B=1, T=0, H=1, K=64, V=32, cu=[0, 70, 71, 200]),
  "dense_K128_V128_T200": dict(B=1, T=200, H=1, K=128, V=128, f16=True),
}
run_cases(cases, run, sys.argv[1:] or list(cases))
