"""nn.Module layers built on linflow's ops."""
from linflow.nn.deltanet import DeltaNet, DeltaNetState
from linflow.nn.flow_deltanet import FlowDeltaNet
from linflow.nn.lion import LION

__all__ = ["DeltaNet", "DeltaNetState", "FlowDeltaNet", "LION"]
