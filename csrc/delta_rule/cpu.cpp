// Delta rule on the CPU: the ATen chunk form (BLAS matmuls, batched over sequence x head x chunk).
#include <torch/library.h>

#include "delta_rule/delta_rule.h"

TORCH_LIBRARY_IMPL(linflow, CPU, m) {
  m.impl("delta_rule_fwd", &linflow::delta_rule::fwd_aten);
  m.impl("delta_rule_bwd", &linflow::delta_rule::bwd_aten);
  m.impl("delta_rule_step", &linflow::delta_rule::step_aten);
}
