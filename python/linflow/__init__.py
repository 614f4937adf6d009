"""linflow: fast, tested C++/CUDA kernels for sub-quadratic sequence mixers, as torch ops with autograd."""
from linflow.ops.delta_rule import delta_rule, delta_rule_step
from linflow.ops.deltaformer import deltaformer
from linflow.ops.flow import flow_delta_rule, flow_transition
from linflow.ops.lion import lion

__all__ = ["delta_rule", "delta_rule_step", "deltaformer", "flow_delta_rule", "flow_transition", "lion"]
__version__ = "0.1.0"
