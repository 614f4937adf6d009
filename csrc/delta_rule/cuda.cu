// Delta rule on CUDA: launchers. (Fused kernels land here; until then the ATen chunk form runs on the GPU.)
#include <torch/library.h>

#include "delta_rule/delta_rule.h"

TORCH_LIBRARY_IMPL(linflow, CUDA, m) {
  m.impl("delta_rule_fwd", &linflow::delta_rule::fwd_aten);
  m.impl("delta_rule_bwd", &linflow::delta_rule::bwd_aten);
  m.impl("delta_rule_step", &linflow::delta_rule::step_aten);
}
