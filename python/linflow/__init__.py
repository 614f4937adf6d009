"""linflow: fast, tested C++/CUDA kernels for sub-quadratic sequence mixers, as torch ops with autograd."""
from linflow.ops.delta_rule import delta_rule, delta_rule_step
from linflow.ops.deltaformer import deltaformer

__all__ = ["delta_rule", "delta_rule_step", "deltaformer"]
__version__ = "0.1.0"
