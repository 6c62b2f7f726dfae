"""ReLU-affine DEQ cells ``z_next = relu(W z + u)`` with proven structure on ``W``."""
from .base import CellCheck, MatrixOperator, ReLUAffineCell, WeightOperator
from .conv_ops import MonConvOperator, ScaledConvOperator, circular_conv_norm
from .ibp_monotone import IBPMonConv2d, IBPMonLinear
from .monotone import MonConv2d, MonLinear
from .orthogonal import OrthoConv2d, OrthoLinear

__all__ = [
    "ReLUAffineCell", "WeightOperator", "MatrixOperator", "ScaledConvOperator",
    "MonConvOperator", "CellCheck", "circular_conv_norm",
    "MonLinear", "MonConv2d", "IBPMonLinear", "IBPMonConv2d", "OrthoLinear", "OrthoConv2d",
]
