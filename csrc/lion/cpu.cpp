// LION on the CPU: the ATen forms (BLAS matmuls, batched over sequence x head [x chunk]).
#include <torch/library.h>

#include "lion/lion.h"

TORCH_LIBRARY_IMPL(linflow, CPU, m) {
  m.impl("lion_fwd", &linflow::lion::fwd_aten);
  m.impl("lion_bwd", &linflow::lion::bwd_aten);
}
