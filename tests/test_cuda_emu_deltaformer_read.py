"""Deltaformer read-pass kernels (csrc/deltaformer/read_kernel.cuh) without a GPU: their real source runs on the CPU
CUDA emulation of tests/cuda_emu (one OS thread per CUDA thread, warp collectives, mma.sync / ldmatrix fragments,
deferred cp.async, poisoned shared memory); o, lse, dq, dk, du are compared with float64 causal softmax attention
(GQA). A quick subset: varlen with an empty and a one-token sequence (fp16, V = 32), and two query heads on one KV
head with K != V over 100 tokens (bf16). The full list: python tests/cuda_emu/check_deltaformer_read.py."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "cuda_emu" / "check_deltaformer_read.py"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_deltaformer_read_kernels_on_cpu_emulation():
    pytest.importorskip("numpy")
    r = subprocess.run([sys.executable, str(SCRIPT), "varlen_K64_V32_f16", "gqa_K128_V64_T100_G2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
