"""Bounds of ReLU-affine cells ``relu(W z + u)``: the proved interval fixed point, the monotone-ball
fallback and the adjoint relaxation, behind the CellBounds protocol."""
from .strategy import ReLUAffineBounds

__all__ = ["ReLUAffineBounds"]
