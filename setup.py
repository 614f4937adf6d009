"""Build linflow's C++/CUDA extension.

Environment switches:
  LINFLOW_FORCE_CPU=1        build without CUDA sources even when a toolkit is present
  TORCH_CUDA_ARCH_LIST=9.0   CUDA archs (default "9.0"; sm_90a is added for 9.0 so Hopper-only code is used)
  MAX_JOBS, NVCC_THREADS     parallel compile jobs / nvcc threads per job
  LINFLOW_DEBUG=1            -O0 -g, device line info
"""
import glob
import os

from setuptools import find_packages, setup

# torch finds the toolkit from `which nvcc`; a wrapper script in /usr/local/bin would make that /usr/local. Prefer
# the toolkit folder itself when there is one.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("LINFLOW_FORCE_CPU", "0") == "1":
        return False
    return CUDA_HOME is not None and torch.version.cuda is not None


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def nvcc_arch_flags() -> list[str]:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(",", ";").replace(" ", ";")
    flags = []
    for arch in filter(None, archs.split(";")):
        ptx = arch.endswith("+PTX")
        num = arch.replace("+PTX", "").replace(".", "")
        if num == "90":
            num = "90a"  # Hopper: wgmma / setmaxnreg need the arch-specific target
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cuda_include_dirs() -> list[str]:
    """Headers of the CUDA libraries torch's headers include (cusparse.h, ...). A bare toolkit may lack them; then
    take them from pip's nvidia wheels that come with torch."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    return [d for base in nvidia.__path__ for d in sorted(glob.glob(os.path.join(base, "cu1*", "include")))]


def cudart_link_dirs() -> list[str]:
    """torch's build links -lcudart. A bare toolkit may ship no libcudart.so; then link against the wheel's
    libcudart.so.<major> through a symlink in build/ (at run time torch has already loaded it)."""
    for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.exists(os.path.join(CUDA_HOME, d, "libcudart.so")):
            return []
    try:
        import nvidia
    except ImportError:
        return []
    libs = [p for base in nvidia.__path__ for p in sorted(glob.glob(os.path.join(base, "cu1*", "lib", "libcudart.so.*")))]
    if not libs:
        return []
    shim = os.path.join(ROOT, "build", "cudart_shim")
    os.makedirs(shim, exist_ok=True)
    link = os.path.join(shim, "libcudart.so")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(libs[0], link)
    return [shim]


def extension():
    debug = os.environ.get("LINFLOW_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]  # the C++ standard: the one this torch asks for (BuildExtension adds it)
    include_dirs = [os.path.join(ROOT, "csrc")]
    cpp_sources = sources("*.cpp")
    if not want_cuda():
        return CppExtension("linflow._C", cpp_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            f"--threads={os.environ.get('NVCC_THREADS', '2')}"] + nvcc_arch_flags()
    if any("sm_90a" in f for f in nvcc):
        nvcc += ["-DLINFLOW_SM90A=1"]  # the launchers may pick the wgmma kernels on a 9.0 device
    if debug:
        nvcc += ["-G"]
    # -isystem: searched after the toolkit's own -I headers, so only what the toolkit lacks comes from the wheels.
    late = [f for d in cuda_include_dirs() for f in ("-isystem", d)]
    cxx += late
    nvcc += late
    return CUDAExtension("linflow._C", cpp_sources + sources("*.cu"), include_dirs=include_dirs,
                         define_macros=[("LINFLOW_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx + ["-DLINFLOW_WITH_CUDA=1"], "nvcc": nvcc},
                         library_dirs=cudart_link_dirs(), extra_link_args=["-fopenmp"])


setup(
    name="linflow",
    version="0.1.0",
    description="Fast, tested C++/CUDA kernels for sub-quadratic sequence mixers (delta rule, Deltaformer, LION, ParallelFlow)",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
)
