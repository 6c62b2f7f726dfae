"""Bounds through DEQs with generic cells ``cell(z, x)``, by a nested auto_LiRPA module."""
from .box import contraction_ball_box, prove_generic_box
from .cell_bounder import CellBounder
from .contraction import (ContractionError, contraction_certificate, declare_contraction,
                          graph_lipschitz, sampled_lipschitz)

__all__ = ["CellBounder", "ContractionError", "contraction_certificate", "declare_contraction",
           "graph_lipschitz", "sampled_lipschitz", "prove_generic_box", "contraction_ball_box"]
