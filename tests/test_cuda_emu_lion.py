"""LION sweep kernels (csrc/lion/kernels.cuh) without a GPU: tests/cuda_emu/check_lion.py runs their real source on
the CPU emulation of CUDA (tests/cuda_emu/shim) — the forward (o) and the kernel backward's whole pipeline
(cuda_host.cpp bwd_kernels: recompute launch, three gradient-mode launch pairs, dg / dlam)
— against torch float64 autograd of reference.lion_ref: bf16 and fp16, T = 1, partial chunks, K != V, every decay,
normalize on / off, varlen. Not covered here: timing, bank conflicts, the hardware memory model."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "cuda_emu" / "check_lion.py"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_lion_kernels_on_cpu_emulation():
    pytest.importorskip("numpy")
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
