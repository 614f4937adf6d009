"""Writes the emulated common/mma.cuh and common/tile.cuh (into argv[2]/common) from the real ones (argv[1]): the
PTX pieces (mma.sync, ldmatrix, cp.async) are replaced by the emulation in shim/emu.h, WMMA by stubs; the rest of
each header (fragment address helpers, tile loaders) is the real code."""
import os, sys
csrc, out = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(out, "common"), exist_ok=True)
here = os.path.dirname(os.path.abspath(__file__))
real = open(os.path.join(csrc, "common/mma.cuh")).read()
head = open(os.path.join(here, "mma_emu_head.inc")).read()
open(os.path.join(out, "common/mma.cuh"), "w").write(head + real[real.index("// B fragments of two adjacent"):])
t = open(os.path.join(csrc, "common/tile.cuh")).read().replace("#include <mma.h>\n", '#include "emu.h"\n')
a, b = t.index("__device__ __forceinline__ void cp_async16("), t.index("// NT: the block's thread count.")
t = t[:a] + open(os.path.join(here, "tile_emu_cpasync.inc")).read() + t[b:]
a = t.index("// C (fp32, row-major, ldc) = [acc_scale C +] A . B on tensor cores.")
t = t[:a] + open(os.path.join(here, "tile_emu_wmma_stubs.inc")).read()
open(os.path.join(out, "common/tile.cuh"), "w").write(t)
