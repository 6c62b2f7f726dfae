"""Fixed-point solvers for DEQs.

Generic (any batched map ``f``): ``fixed_point_iter``, ``anderson``, ``broyden``.
Structured (monDEQ splitting, need a :class:`ReLUAffineProblem`): ``forward_backward``,
``peaceman_rachford``. All return ``(z, SolverStats)`` and take a warm start ``z0``.
Per-row stopping with batch compaction: ``compacting_anderson`` (returns a ``CompactingResult``).
``register_solver(name, fn)`` adds one.
"""
from .anderson import anderson
from .broyden import broyden
from .compacting import CompactingResult, compacting_anderson
from .fixed_point import fixed_point_iter
from .problem import ReLUAffineProblem
from .registry import (SOLVERS, generic_solver_names, get_solver, register_solver, requires_problem,
                       solver_options)
from .pr import peaceman_rachford
from .splitting import default_fb_alpha, default_pr_alpha, forward_backward
from .steps import MonotoneBounds, fb_rate, pr_rate
from .stats import RESIDUAL_EPS, SolverStats, per_sample_residual

__all__ = [
    "SOLVERS", "get_solver", "register_solver", "generic_solver_names", "requires_problem", "solver_options", "SolverStats",
    "ReLUAffineProblem", "per_sample_residual", "RESIDUAL_EPS", "default_fb_alpha",
    "default_pr_alpha", "MonotoneBounds", "fb_rate", "pr_rate",
    "fixed_point_iter", "anderson", "broyden", "forward_backward", "peaceman_rachford",
    "compacting_anderson", "CompactingResult",
]
