"""CPU check of the decode step kernels (csrc/delta_rule/step_kernel.cuh, step_kernel_v2.cuh) on the CUDA emulation
of tests/cuda_emu/shim: step_main.cpp runs both on random strided inputs and compares with float64.
    python tests/cuda_emu/check_step.py        (needs g++; EMU_SKEW=1 EMU_SKEW_US=300 checks the barriers)"""
import os, subprocess, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emu_build import build  # noqa: E402

_, BIN = build("step_main.cpp", "step")
sys.exit(subprocess.run([BIN]).returncode)
