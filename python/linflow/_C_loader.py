"""Loads the compiled extension, which registers the torch.ops.linflow.* operators."""
import torch  # noqa: F401  (the extension links against torch's libraries)

from linflow import _C  # noqa: F401

HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("linflow::delta_rule_fwd", "CUDA")
