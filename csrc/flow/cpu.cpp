// Rank-R delta rule on the CPU: the ATen chunk form on the interleaved sequence (BLAS matmuls).
#include <torch/library.h>

#include "flow/flow.h"

TORCH_LIBRARY_IMPL(linflow, CPU, m) {
  m.impl("flow_fwd", &linflow::flow::fwd_aten);
  m.impl("flow_bwd", &linflow::flow::bwd_aten);
}

// Built from differentiable ATen ops: one registration serves every device and autograd.
TORCH_LIBRARY_IMPL(linflow, CompositeImplicitAutograd, m) {
  m.impl("flow_transition", &linflow::flow::transition);
}
