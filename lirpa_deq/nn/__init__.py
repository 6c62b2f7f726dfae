"""DEQ layers: ReLU-affine cells with proven structure, generic cells, the DEQ layer, warm starts."""
from .cells import (CellCheck, IBPMonConv2d, IBPMonLinear, MonConv2d, MonLinear, OrthoConv2d,
                    OrthoLinear, ReLUAffineCell, WeightOperator)
from .cells.generic_examples import ConvBNCell, DenseReLUCell, ResidualCell, TanhCell
from .deq import DEQ, DEQConvergenceError, DEQConvergenceWarning
from ..bounds.generic.contraction import ContractionError, declare_contraction
from .warm_start import deq_modules, serial_warm_start

__all__ = [
    "DEQ", "DEQConvergenceError", "DEQConvergenceWarning", "serial_warm_start", "deq_modules",
    "ReLUAffineCell", "WeightOperator", "CellCheck",
    "MonLinear", "MonConv2d", "IBPMonLinear", "IBPMonConv2d", "OrthoLinear", "OrthoConv2d",
    "declare_contraction", "ContractionError",
    "TanhCell", "ResidualCell", "ConvBNCell", "DenseReLUCell",
]
