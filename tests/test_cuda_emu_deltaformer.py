"""Deltaformer write-pass backward kernels (csrc/deltaformer/write_bwd_kernel.cuh) without a GPU: their real source
runs on the CPU CUDA emulation of tests/cuda_emu (one OS thread per CUDA thread, warp collectives, mma.sync /
ldmatrix fragments, deferred cp.async, poisoned shared memory) and every output (dv, dbeta, dw, dk) is compared
with a float64 transcription of write_backward (chunk_aten.cpp). A quick subset: a partial last chunk over
three chunks (both kernels' two warp groups), varlen with a one-token sequence, fp16 with w = k. The full list:
python tests/cuda_emu/check_deltaformer_write_bwd.py."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "cuda_emu" / "check_deltaformer_write_bwd.py"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_deltaformer_write_bwd_kernels_on_cpu_emulation():
    pytest.importorskip("numpy")
    r = subprocess.run([sys.executable, str(SCRIPT), "dense_K64_V64_T130", "varlen_K64_V32",
                        "dense_K32_V128_T70_now_f16"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
