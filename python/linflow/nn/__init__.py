"""nn.Module layers built on linflow's ops."""
from linflow.nn.deltanet import DeltaNet, DeltaNetState

__all__ = ["DeltaNet", "DeltaNetState"]
