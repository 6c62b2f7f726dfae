"""Name -> solver registry. Every solver has the signature
``solve(f, z0, *, tol, max_iter, **opts) -> (z, SolverStats)``; those with
``requires_problem = True`` need ``f`` to be a :class:`ReLUAffineProblem`."""
from __future__ import annotations

import inspect

from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point_iter
from .pr import peaceman_rachford
from .splitting import forward_backward

SOLVERS = {
    "anderson": anderson,
    "broyden": broyden,
    "fixed_point_iter": fixed_point_iter,
    "forward_backward": forward_backward,
    "peaceman_rachford": peaceman_rachford,
}


def get_solver(name: str):
    """Look a solver up by name; unknown names raise ValueError listing the valid ones."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; valid solvers: {sorted(SOLVERS)}") from None


def requires_problem(solver) -> bool:
    """True for the splitting solvers, which need a ReLUAffineProblem rather than any map."""
    return bool(getattr(solver, "requires_problem", False))


def solver_options(solver) -> tuple:
    """Names of the solver-specific keyword options (everything except ``tol``/``max_iter``)."""
    params = inspect.signature(solver).parameters.values()
    return tuple(p.name for p in params
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("tol", "max_iter"))
