"""CPU check of chunk_bwd_kernel (after wy_fwd's W, U and Tm stores, checked too) without a GPU: the real kernel source runs on an emulation of the CUDA
features it uses (tests/cuda_emu/shim: one OS thread per CUDA thread, warp collectives and mma.sync / ldmatrix
through per-warp exchange slots, deferred cp.async, shared memory poisoned with 0xFF), on random bf16 inputs
(q, k, v, beta, g, dO, vn, dvn, h, dh taken as given), against a float64 numpy transcription of the per-chunk
math in csrc/delta_rule/kernels_bwd.cuh. Slow (seconds a block); bf16 and fp16.
    python tests/cuda_emu/check_chunk_bwd.py [case ...]
EMU_SKEW=1 (or 2) delays warp w (or 7 - w) by w x 5 ms at every warp collective: a missing __syncthreads then
reads poisoned shared memory (a removed barrier before the dQK / G reads is caught this way; ~20 s a block).
"""
import numpy as np, os, subprocess, sys
from emu_build import build, codec, run_cases, seq_layout
WORK, BIN = build("chunk_bwd_main.cpp", "chunk_bwd")
RUNS = os.path.join(WORK, "runs")
C = 64

def run(name, B, T, H, K, V, gated, cu=None, seed=0, f16=False, blocks=3):
    enc, dec = codec(f16)
    rng = np.random.default_rng(seed)
    varlen, total, N, slots, seqs = seq_layout(B, T, cu, C)
    if varlen: B = 1
    scale = K ** -0.5
    d = os.path.join(RUNS, name); os.makedirs(d, exist_ok=True)
    arr = {}
    def mk(nm, shape, s=1.0):
        u = enc(rng.standard_normal(shape).astype(np.float32) * s)
        u.tofile(f"{d}/{nm}.bin"); arr[nm] = dec(u).astype(np.float64)
    mk("q", (total, H, K), 0.3); mk("k", (total, H, K), 0.3); mk("v", (total, H, V)); mk("vn", (total, H, V))
    mk("dout", (total, H, V)); mk("dvn", (total, H, V)); mk("h", (slots, H, K, V), 0.5); mk("dh", (slots, H, K, V), 0.5)
    beta = rng.uniform(0.1, 0.9, (total, H)).astype(np.float32); beta.tofile(f"{d}/beta.bin")
    g = (-rng.uniform(0.0, 0.2, (total, H))).astype(np.float32)
    if gated: g.tofile(f"{d}/g.bin")
    if varlen: np.asarray(cu, np.int64).tofile(f"{d}/cu.bin")
    open(f"{d}/params.txt", "w").write(f"{B} {T} {H} {K} {V} {N} {int(varlen)} {int(gated)} {scale!r} {slots} {total}\n")
    r = subprocess.run([BIN, d, "f16" if f16 else "bf16", str(blocks)], capture_output=True, text=True)
    if r.returncode: print(r.stdout, r.stderr); raise SystemExit(f"{name}: emu failed")
    out = dict(dq=dec(np.fromfile(f"{d}/dq.out", np.uint16)).reshape(total, H, K),
               dk=dec(np.fromfile(f"{d}/dk.out", np.uint16)).reshape(total, H, K),
               dv=dec(np.fromfile(f"{d}/dv.out", np.uint16)).reshape(total, H, V),
               dbeta=np.fromfile(f"{d}/dbeta.out", np.float32).reshape(total, H),
               dg=np.fromfile(f"{d}/dg.out", np.float32).reshape(total, H),
               tm=dec(np.fromfile(f"{d}/tm.out", np.uint16)).reshape(total, H, C),
               w=dec(np.fromfile(f"{d}/w.out", np.uint16)).reshape(total, H, K),
               u=dec(np.fromfile(f"{d}/u.out", np.uint16)).reshape(total, H, V))
    ref = {k_: np.full_like(v_, np.nan, dtype=np.float64) for k_, v_ in out.items()}
    for n, (bos, ln) in enumerate(seqs):
        slot0 = (bos // C + n) if varlen else n * ((T + C - 1) // C)
        for c in range((ln + C - 1) // C):
            rows = min(C, ln - c * C); t0 = bos + c * C; slot = slot0 + c
            for hh in range(H):
                def pad(x):
                    y = np.zeros((C,) + x.shape[1:]); y[:rows] = x; return y
                Q = pad(arr["q"][t0:t0 + rows, hh]); Kc = pad(arr["k"][t0:t0 + rows, hh])
                Vv = pad(arr["v"][t0:t0 + rows, hh]); Vn = pad(arr["vn"][t0:t0 + rows, hh])
                dO = pad(arr["dout"][t0:t0 + rows, hh]); dVn = pad(arr["dvn"][t0:t0 + rows, hh])
                be = pad(beta[t0:t0 + rows, hh].astype(np.float64))
                gg = pad(g[t0:t0 + rows, hh].astype(np.float64)) if gated else np.zeros(C)
                gam = np.cumsum(gg)
                hS = arr["h"][slot, hh]; dhS = arr["dh"][slot, hh]
                r_ = np.arange(C)[:, None]; u_ = np.arange(C)[None, :]
                E = np.where(u_ <= r_, np.exp(np.minimum(gam[:, None] - gam[None, :], 0) if False else gam[:, None] - gam[None, :]), 0.0)
                KKE = (Kc @ Kc.T) * E
                L1 = (u_ < r_)
                A = np.where(L1, be[:, None] * KKE, 0.0)
                Tm = np.linalg.inv(np.eye(C) + A)
                dVb = Tm.T @ dVn
                dv = be[:, None] * dVb
                dZ = scale * dO @ Vn.T; dA = -dVb @ Vn.T
                dQg = scale * dO @ hS.T; dKd = Vn @ dhS.T; dKb = -dVb @ hS.T
                hs = np.sum(hS * dhS)
                P = Q @ Kc.T
                dQK = np.where(u_ <= r_, dZ, 0) * E
                dAm = np.where(L1, dA, 0)
                G = dAm * be[:, None] * E
                hz = dZ * P * E; ha = dAm * be[:, None] * KKE
                dgam = hz.sum(1) - hz.sum(0) + ha.sum(1) - ha.sum(0)
                dbeta = (dVb * Vv).sum(1) + (dAm * KKE).sum(1)
                eg = np.exp(gam); kd = np.exp(gam[-1] - gam)
                dq = eg[:, None] * dQg + dQK @ Kc
                dgam += eg * (dQg * Q).sum(1)
                kb = (dKb * Kc).sum(1); hd = (dKd * Kc).sum(1)
                dk = kd[:, None] * dKd + (be * eg)[:, None] * dKb + dQK.T @ Q + G @ Kc + G.T @ Kc
                dgam += be * eg * kb - kd * hd; dbeta += eg * kb
                dgam[-1] += (kd * hd).sum() + np.exp(gam[-1]) * hs
                dg = np.cumsum(dgam[::-1])[::-1]
                sl = slice(t0, t0 + rows)
                ref["dq"][sl, hh] = dq[:rows]; ref["dk"][sl, hh] = dk[:rows]; ref["dv"][sl, hh] = dv[:rows]
                ref["dbeta"][sl, hh] = dbeta[:rows]; ref["dg"][sl, hh] = dg[:rows]; ref["tm"][sl, hh] = Tm[:rows]
                ref["w"][sl, hh] = (Tm @ ((be * eg)[:, None] * Kc))[:rows]; ref["u"][sl, hh] = (Tm @ (be[:, None] * Vv))[:rows]
    ok = True
    for k_ in out:
        if k_ == "dg" and not gated: continue
        o, rf = out[k_].astype(np.float64), ref[k_]
        nan_o = np.isnan(o).sum(); nan_r = np.isnan(rf).sum()
        err = np.nanmax(np.abs(o - rf)) / (np.nanmax(np.abs(rf)) + 1e-12)
        bad = nan_o > 0 or nan_r > 0 or err > 2e-2
        ok &= not bad
        print(f"  {name:28s} {k_:6s} rel-max-err {err:.2e}  nan(out) {nan_o} nan(ref) {nan_r} {'FAIL' if bad else 'ok'}")
    return ok

# A persistent grid of `blocks` blocks over slots x H items (several items a block, odd counts: both header
# buffers, the v-tile ring across items, prefetch distance 1 at V <= 32).
cases = {
  "dense_K128_V128_g": dict(B=1, T=128, H=1, K=128, V=128, gated=True, blocks=1),
  "dense_K128_V32_g": dict(B=1, T=192, H=1, K=128, V=32, gated=True, blocks=2),
  "dense_K100_V40_partial_g": dict(B=2, T=100, H=2, K=100, V=40, gated=True),
  "dense_K64_V37_nog": dict(B=1, T=70, H=1, K=64, V=37, gated=False),
  "dense_K48_V64_g": dict(B=1, T=64, H=1, K=48, V=64, gated=True),
  "varlen_K128_V72_g": dict(B=1, T=0, H=2, K=128, V=72, gated=True, cu=[0, 70, 75, 200]),
  "f16_dense_K128_V96_g": dict(B=1, T=90, H=1, K=128, V=96, gated=True, f16=True),
}
run_cases(cases, run, sys.argv[1:] or list(cases))
