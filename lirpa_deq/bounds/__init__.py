"""auto_LiRPA support for DEQ layers: the fixed-point node and its bounds."""
from auto_LiRPA import BoundedModule, register_custom_op

from . import guard

from .bound_deq import BoundDEQ, deq_nodes, deq_options
from .interval import (IntervalOptions, IntervalProofError, interval_step, preactivation_box,
                       prove_interval_fixed_point)
from .node import OP_NAME, is_tracing, traced_deq

register_custom_op(OP_NAME, BoundDEQ)
guard.install(BoundedModule)

__all__ = ["BoundDEQ", "OP_NAME", "IntervalOptions", "IntervalProofError", "interval_step",
           "preactivation_box", "prove_interval_fixed_point", "traced_deq", "is_tracing",
           "deq_options", "deq_nodes"]
