"""CPU check of the Deltaformer read-pass kernels (csrc/deltaformer/read_kernel.cuh) without a GPU: the real kernel
source runs on the CUDA emulation of tests/cuda_emu/shim (see check_chunk_bwd.py), on random 16-bit q, k, u, dO,
against causal softmax attention with GQA in float64 (per sequence, query head h reading KV head h // (H / Hkv)):
    S = s Q K^T (causal), lse = logsumexp(S), P = exp(S - lse), O = P U,
    Drow = rowsum(dO o O), dS = P o (dO U^T - Drow), dQ = s dS K, dK = s dS^T Q, dU = P^T dO  (dK, dU summed over
    the group's query heads).
The forward (o, lse) runs on the inputs; the backward runs on the reference o (16-bit) and lse, so each is
checked on its own. Errors: max |out - ref| / max |ref| per output (2e-2 allowed: 16-bit operands).
    python tests/cuda_emu/check_deltaformer_read.py [case ...]
EMU_SKEW=1 (or 2) EMU_SKEW_US=300 skews the warps at every collective (barrier check; slow: use one small case).
"""
import numpy as np, os, subprocess, sys
from emu_build import build, codec, run_cases, seq_layout
WORK, BIN = build("read_main.cpp", "read")
RUNS = os.path.join(WORK, "runs")
C = 64


def run(name, B, T, H, Hkv, K, V, cu=None, seed=0, f16=False):
    enc, dec = codec(f16)
    rng = np.random.default_rng(seed)
    varlen, total, N, slots, seqs = seq_layout(B, T, cu, C)
    scale = K ** -0.5
    G = H // Hkv
    d = os.path.join(RUNS, name); os.makedirs(d, exist_ok=True)
    def mk(nm, shape, s=1.0):
        u = enc(rng.standard_normal(shape).astype(np.float32) * s)
        u.tofile(f"{d}/{nm}.bin")
        return dec(u).astype(np.float64)
    q = mk("q", (total, H, K)); k = mk("k", (total, Hkv, K)); u = mk("u", (total, Hkv, V))
    dO = mk("do", (total, H, V))
    o = np.zeros((total, H, V)); lse = np.zeros((total, H))
    for bos, ln in seqs:
        if ln == 0: continue
        sl = slice(bos, bos + ln); mask = np.tril(np.ones((ln, ln), bool))
        for h in range(H):
            S = np.where(mask, scale * q[sl, h] @ k[sl, h // G].T, -np.inf)
            m = S.max(1); ls = m + np.log(np.exp(S - m[:, None]).sum(1))
            lse[sl, h] = ls; o[sl, h] = np.exp(S - ls[:, None]) @ u[sl, h // G]
    o16 = enc(o.astype(np.float32)); o16.tofile(f"{d}/oref.bin"); o_b = dec(o16).astype(np.float64)
    lse.astype(np.float32).tofile(f"{d}/lseref.bin"); lse32 = lse.astype(np.float32).astype(np.float64)
    ref = dict(o=o, lse=lse, dq=np.zeros((total, H, K)), dk=np.zeros((total, Hkv, K)), du=np.zeros((total, Hkv, V)))
    for bos, ln in seqs:
        if ln == 0: continue
        sl = slice(bos, bos + ln); mask = np.tril(np.ones((ln, ln), bool))
        for h in range(H):
            hk = h // G
            P = np.where(mask, np.exp(scale * q[sl, h] @ k[sl, hk].T - lse32[sl, h][:, None]), 0)
            D = (dO[sl, h] * o_b[sl, h]).sum(1)
            dS = P * (dO[sl, h] @ u[sl, hk].T - D[:, None])
            ref["dq"][sl, h] = scale * dS @ k[sl, hk]
            ref["dk"][sl, hk] += scale * dS.T @ q[sl, h]
            ref["du"][sl, hk] += P.T @ dO[sl, h]
    if varlen: np.asarray(cu, np.int64).tofile(f"{d}/cu.bin")
    open(f"{d}/params.txt", "w").write(
        f"{T if not varlen else total} {H} {Hkv} {K} {V} {N} {int(varlen)} {scale!r} {slots} {total}\n")
    covered = np.zeros(total, bool)
    for bos, ln in seqs: covered[bos:bos + ln] = True
    ok = True
    rr = subprocess.run([BIN, d, "f16" if f16 else "bf16"], capture_output=True, text=True)
    if rr.returncode: print(rr.stdout, rr.stderr); raise SystemExit(f"{name}: emu failed")
    out = dict(o=dec(np.fromfile(f"{d}/o.out", np.uint16)).reshape(total, H, V),
               lse=np.fromfile(f"{d}/lse.out", np.float32).reshape(total, H),
               dq=np.fromfile(f"{d}/dq.out", np.float32).reshape(total, H, K),
               dk=np.fromfile(f"{d}/dk.out", np.float32).reshape(total, Hkv, K),
               du=np.fromfile(f"{d}/du.out", np.float32).reshape(total, Hkv, V))
    for k_ in out:
        x, rf = out[k_][covered].astype(np.float64), ref[k_][covered]
        nan_o = np.isnan(x).sum()
        err = np.max(np.abs(x - rf)) / (np.max(np.abs(rf)) + 1e-12) if x.size else 0.0
        bad = nan_o > 0 or not err <= 2e-2
        ok &= not bad
        print(f"  {name:34s} {k_:4s} rel-max-err {err:.2e}  nan(out) {nan_o} {'FAIL' if bad else 'ok'}",
              flush=True)
    return ok


cases = {
  "dense_K64_V64_T130": dict(B=1, T=130, H=1, Hkv=1, K=64, V=64),
  "gqa_K128_V64_T100_B2": dict(B=2, T=100, H=4, Hkv=2, K=128, V=64),
  "gqa_K128_V64_T100_G2": dict(B=1, T=100, H=2, Hkv=1, K=128, V=64),
  "varlen_K64_V32_f16": dict(B=1, T=0, H=2, Hkv=1, K=64, V=32, cu=[0, 70, 70, 71, 200], f16=True),
  "dense_K40_V128_T64_f16": dict(B=1, T=64, H=1, Hkv=1, K=40, V=128, f16=True),
  "dense_K128_V128_T200": dict(B=1, T=200, H=1, Hkv=1, K=128, V=128),
  "dense_T1": dict(B=1, T=1, H=2, Hkv=2, K=64, V=64),
  "mqa_K96_V120_T257": dict(B=1, T=257, H=3, Hkv=1, K=96, V=120, f16=True),
}
run_cases(cases, run, sys.argv[1:] or list(cases))
