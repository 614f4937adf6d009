"""Signatures of other libraries on top of linflow's ops (``linflow.compat.fla``: flash-linear-attention)."""
from linflow.compat import fla

__all__ = ["fla"]
