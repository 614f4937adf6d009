"""nn.Module layers built on linflow's ops."""
from linflow.nn.deltaformer import Deltaformer
from linflow.nn.deltanet import DeltaNet, DeltaNetState
from linflow.nn.flow_deltanet import FlowDeltaNet
from linflow.nn.lion import LION

__all__ = ["DeltaNet", "DeltaNetState", "Deltaformer", "FlowDeltaNet", "LION"]
