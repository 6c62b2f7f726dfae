"""DEQ layers: ReLU-affine cells with proven structure, generic cells, the DEQ layer, warm starts."""
from .cells import (CellCheck, IBPMonConv2d, IBPMonLinear, MonConv2d, MonLinear, OrthoConv2d,
                    OrthoLinear, ReLUAffineCell, WeightOperator)
from .cells.generic_examples import ConvBNCell, DenseReLUCell, ResidualCell, TanhCell
from .deq import DEQ, DEQConvergenceError, DEQConvergenceWarning, default_solver
from .fixed_point import (AdjointSystem, FixedPointProblem, GenericFixedPoint, ReLUAffineFixedPoint,
                          fixed_point_problem, register_fixed_point)
from ..bounds.generic.contraction import ContractionError, declare_contraction
from .warm_start import deq_modules, serial_warm_start
from .warm_state import WarmStart, warm_start_state

__all__ = [
    "DEQ", "DEQConvergenceError", "DEQConvergenceWarning", "default_solver",
    "serial_warm_start", "deq_modules", "warm_start_state", "WarmStart",
    "FixedPointProblem", "ReLUAffineFixedPoint", "GenericFixedPoint", "AdjointSystem",
    "fixed_point_problem", "register_fixed_point",
    "ReLUAffineCell", "WeightOperator", "CellCheck",
    "MonLinear", "MonConv2d", "IBPMonLinear", "IBPMonConv2d", "OrthoLinear", "OrthoConv2d",
    "declare_contraction", "ContractionError",
    "TanhCell", "ResidualCell", "ConvBNCell", "DenseReLUCell",
]
