"""DEQ layers: ReLU-affine cells with proven structure, the DEQ layer, warm starts."""
from .cells import (CellCheck, IBPMonConv2d, IBPMonLinear, MonConv2d, MonLinear, OrthoConv2d,
                    OrthoLinear, ReLUAffineCell, WeightOperator)
from .deq import DEQ, DEQConvergenceError, DEQConvergenceWarning
from .warm_start import deq_modules, serial_warm_start

__all__ = [
    "DEQ", "DEQConvergenceError", "DEQConvergenceWarning", "serial_warm_start", "deq_modules",
    "ReLUAffineCell", "WeightOperator", "CellCheck",
    "MonLinear", "MonConv2d", "IBPMonLinear", "IBPMonConv2d", "OrthoLinear", "OrthoConv2d",
]
