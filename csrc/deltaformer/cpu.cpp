// Deltaformer on the CPU: the ATen chunk form (BLAS matmuls batched over sequence x head).
#include <torch/library.h>

#include "deltaformer/deltaformer.h"

TORCH_LIBRARY_IMPL(linflow, CPU, m) {
  m.impl("deltaformer_fwd", &linflow::deltaformer::fwd_aten);
  m.impl("deltaformer_bwd", &linflow::deltaformer::bwd_aten);
}
