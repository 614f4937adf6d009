// LION on CUDA: the device-generic ATen forms of lion_aten.cpp (cuBLAS matmuls) until dedicated kernels land.
#ifdef LINFLOW_WITH_CUDA
#include <torch/library.h>

#include "lion/lion.h"

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("lion_fwd", &linflow::lion::fwd_aten);
  m.impl("lion_bwd", &linflow::lion::bwd_aten);
}
#endif  // LINFLOW_WITH_CUDA
