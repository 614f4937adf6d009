"""Shared by the emulation checks (check_*.py): build a driver against the CUDA shims, and the 16-bit codecs."""
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def build(main_cpp: str, name: str, defines=()) -> tuple[str, str]:
    """Compiles tests/cuda_emu/<main_cpp> (with the kernels' real headers from csrc/, shimmed) into a fresh temp
    folder; returns (folder, binary)."""
    work = tempfile.mkdtemp(prefix=f"cuda_emu_{name}_")
    subprocess.run([sys.executable, os.path.join(HERE, "make_shims.py"), os.path.join(ROOT, "csrc"),
                    os.path.join(work, "shim")], check=True)
    binary = os.path.join(work, name)
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", *[f"-D{d}" for d in defines],
                    "-I" + os.path.join(work, "shim"), "-I" + os.path.join(HERE, "shim"),
                    "-I" + os.path.join(ROOT, "csrc"), os.path.join(HERE, main_cpp), "-o", binary], check=True)
    return work, binary


def bf16(x):
    """float32 -> bf16 bits (round to nearest even)."""
    x = np.ascontiguousarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7fff + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def codec(f16: bool):
    """(encode float32 -> 16-bit bits, decode bits -> float32) for fp16 or bf16."""
    if f16:
        return (lambda x: np.asarray(x, np.float32).astype(np.float16).view(np.uint16)), \
               (lambda u: u.view(np.float16).astype(np.float32))
    return bf16, (lambda u: (u.astype(np.uint32) << 16).view(np.float32))


def seq_layout(B: int, T: int, cu, C: int = 64):
    """Token layout of a case: (varlen, total tokens, sequences N, chunk slots, [(bos, len)] per sequence), with
    the slot count the kernels use (varlen: total / C + N, else N ceil(T / C))."""
    varlen = cu is not None
    total = cu[-1] if varlen else B * T
    N = len(cu) - 1 if varlen else B
    slots = (total + C - 1) // C + N if varlen else N * ((T + C - 1) // C)
    seqs = [(cu[n], cu[n + 1] - cu[n]) for n in range(N)] if varlen else [(n * T, T) for n in range(N)]
    return varlen, total, N, slots, seqs


def run_cases(cases: dict, run, selected) -> None:
    """Runs run(name, **cases[name]) for each selected name, prints ALL OK / SOME FAILED, exits 0 / 1."""
    allok = True
    for name in selected:
        allok &= run(name, **cases[name])
    print("ALL OK" if allok else "SOME FAILED")
    sys.exit(0 if allok else 1)
