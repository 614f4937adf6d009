"""nn.Module layers built on linflow's ops."""
from linflow.nn.deltaformer import Deltaformer
from linflow.nn.deltanet import DeltaNet, DeltaNetState

__all__ = ["DeltaNet", "DeltaNetState", "Deltaformer"]
