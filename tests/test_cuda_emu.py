"""CUDA kernel logic without a GPU: tests/cuda_emu runs the real source of the delta rule's chunk backward (wy_fwd's
recompute, which stores Tm, then chunk_bwd_kernel on a persistent grid of a few blocks) on a CPU emulation of the CUDA features it uses (one OS thread per CUDA thread, warp collectives, mma.sync /
ldmatrix fragments, deferred cp.async, poisoned shared memory, skewed warps) and compares every output with a float64
transcription of its per-chunk math, bf16 and fp16, partial chunks, odd K / V, varlen, several items a block. It
catches fragment-layout, indexing, cp.async-group and missing-barrier mistakes here, before the GPU run (timing, bank
conflicts and the hardware memory model remain the GPU's to check). About 1.5 min on 2 cores."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "cuda_emu" / "check_chunk_bwd.py"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_chunk_bwd_kernel_on_cpu_emulation():
    pytest.importorskip("numpy")
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
