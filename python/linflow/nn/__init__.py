"""nn.Module layers built on linflow's ops."""
from linflow.nn.deltanet import DeltaNet, DeltaNetState
from linflow.nn.lion import LION

__all__ = ["DeltaNet", "DeltaNetState", "LION"]
