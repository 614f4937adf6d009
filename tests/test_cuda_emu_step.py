"""The decode step kernels (csrc/delta_rule/step_kernel.cuh and the default variant step_kernel_v2.cuh)
on the CPU emulation of tests/cuda_emu (see test_cuda_emu.py): odd strides, dtypes, gates, int32 / int64 state indices
with a padding row, T across the staging chunks, K != V, V > 128; against float64. About 15 s on 2 cores."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "cuda_emu" / "check_step.py"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_step_kernels_on_cpu_emulation():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
