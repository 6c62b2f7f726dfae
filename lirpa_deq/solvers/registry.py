"""Name -> solver registry. Every solver has the signature
``solve(f, z0, *, tol, max_iter, **opts) -> (z, SolverStats)``; those with
``requires_problem = True`` need ``f`` to be a :class:`ReLUAffineProblem`.

:func:`register_solver` adds a solver under a name; every place that takes a solver name (``DEQ(solver=...)``,
``bound_opts={'deq': {'solver': ...}}`` for the interval search, smoothing) looks names up here."""
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


def register_solver(name: str, fn, *, requires_problem: bool = False, replace: bool = False):
    """Register ``fn`` as solver ``name`` and return it.

    fn: ``fn(f, z0, *, tol, max_iter, **opts) -> (z, SolverStats)`` solving ``z = f(z)`` batched over the
    leading dimension of ``z0`` (options are keyword-only). requires_problem: True if ``f`` must be a
    :class:`ReLUAffineProblem` (splitting methods; such solvers serve ReLU-affine point solves only).
    replace: allow re-registering an existing name (built-in names included)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a solver name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"solver {name!r} must be callable, got {type(fn).__name__}")
    params = inspect.signature(fn).parameters
    missing = [k for k in ("tol", "max_iter") if k not in params]
    if missing or len([p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) < 2:
        raise TypeError(f"solver {name!r} must have the signature fn(f, z0, *, tol, max_iter, **opts); "
                        f"missing: {missing or ['the positional arguments f, z0']}")
    if name in SOLVERS and not replace:
        raise ValueError(f"solver {name!r} is already registered; pass replace=True to replace it")
    if requires_problem:
        fn.requires_problem = True
    SOLVERS[name] = fn
    return fn


def generic_solver_names() -> list:
    """Names of the registered solvers that accept any map ``f`` (not only a ReLUAffineProblem)."""
    return sorted(name for name, fn in SOLVERS.items() if not requires_problem(fn))


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
