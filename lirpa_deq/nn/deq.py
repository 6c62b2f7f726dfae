"""The DEQ layer: ``z* = cell(z*, u)`` with implicit (adjoint) gradients.

Forward: the fixed point is found under ``torch.no_grad()`` by a registered solver; then ONE
differentiable cell step ``out = cell(z*, u)`` is taken at the (detached) fixed point and a
gradient hook on ``out`` replaces the incoming gradient ``grad`` by the solution ``g`` of the
adjoint system ``g = grad + J^T g`` (``J = d cell / d z`` at z*). Autograd then carries ``g``
through that one step to ``u`` and to the cell parameters (or to the tensors passed in
``params``). The map, the step and the adjoint system of each cell family are its
:class:`~lirpa_deq.nn.fixed_point.FixedPointProblem`; this module owns what is common: start,
iteration budget, solver calls, statistics and the non-convergence policy.
"""
from __future__ import annotations

import numbers
import warnings

import torch
import torch.nn as nn

from ..solvers import generic_solver_names, get_solver, requires_problem, solver_options
from ..validate import check_dtype
from .cells.base import ReLUAffineCell
from .fixed_point import FixedPointProblem, fixed_point_class
from .warm_state import warm_start_state

ON_NONCONVERGENCE = ("warn", "raise", "ignore")
DEFAULT_MAX_ITER = 50
MONOTONE_DEFAULT_MAX_ITER = 200


def default_solver(cell: nn.Module) -> str:
    """The solver a :class:`DEQ` uses for ``cell`` when none is named.

    ``'peaceman_rachford'`` for ReLU-affine cells with ``guarantee == 'monotone'``: its
    convergence is guaranteed for every raw weight (safeguarded Anderson acceleration and the
    step from the proved bounds keep the proven contraction factor; see
    ``lirpa_deq.solvers.pr``). Anderson, the default elsewhere, has no such guarantee and
    stalls on ill-conditioned monotone cells. Everything else (IBP-MonDEQ, norm-constrained and
    generic cells, which are contractive or assumed so): ``'anderson'``.
    """
    if isinstance(cell, ReLUAffineCell) and getattr(cell, "guarantee", None) == "monotone":
        return "peaceman_rachford"
    return "anderson"


class DEQConvergenceError(RuntimeError):
    """A solve missed its tolerance and the layer was built with ``on_nonconvergence='raise'``."""


class DEQConvergenceWarning(RuntimeWarning):
    """A solve missed its tolerance (``on_nonconvergence='warn'``, the default)."""


def _check_tol(name, v):
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not v >= 0:
        raise ValueError(f"{name} must be a real number >= 0, got {v!r}")
    return float(v)


def _check_iters(name, v):
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


class DEQ(nn.Module):
    """Deep equilibrium layer ``z* = cell(z*, u)``.

    cell: a :class:`ReLUAffineCell` (the specialized, fastest path: splitting solvers, proved
    structure) or ANY ``nn.Module`` with ``forward(z, x) -> z`` (a *generic* cell, bounded through
    a nested auto_LiRPA module; see docs/generic.md). A generic cell's state has x's shape unless
    it defines ``state_shape(x_shape) -> z_shape``.

    forward(u, z0=None) -> z*, of u's shape for ReLU-affine cells (``(B, n)`` or ``(B, C, H, W)``).
    solver / backward_solver: names from ``lirpa_deq.solvers.SOLVERS`` (the backward solver
    defaults to the forward one). ``solver=None`` means the cell's default (:func:`default_solver`):
    ``'peaceman_rachford'`` for ``guarantee == 'monotone'`` cells (``MonLinear``, ``MonConv2d``;
    it converges for every raw weight, with the step from the cell's proved bounds), else
    ``'anderson'``. tol / max_iter: forward stopping rule (relative residual
    ``||f(z) - z|| / ||z||`` per sample); ``max_iter=None`` means 50, or
    ``MONOTONE_DEFAULT_MAX_ITER`` (200) when the monotone default solver was chosen for you
    (its iteration count grows with the conditioning ``||I - W|| / m``; MonLinear(128): 15 at
    initialisation, about 60 forward / 90 adjoint for weights scrambled to ``||I - W|| ~ 1e3``).
    backward_* default to the forward values.
    implicit: False differentiates through the solver iterations instead (tests, small
    problems). on_nonconvergence: 'warn' | 'raise' (:class:`DEQConvergenceError`) | 'ignore'.
    solver_opts: passed to the solver(s) that accept them (e.g. ``m``, ``alpha``, ``damping``).

    After each call ``last_stats`` holds the forward :class:`SolverStats`; after each backward
    pass ``last_backward_stats`` holds the adjoint solve's.
    """

    def __init__(self, cell: nn.Module, solver: str | None = None, tol: float = 1e-4,
                 max_iter: int | None = None, backward_solver: str | None = None,
                 backward_tol: float | None = None, backward_max_iter: int | None = None,
                 implicit: bool = True, on_nonconvergence: str = "warn", **solver_opts):
        super().__init__()
        if not isinstance(cell, nn.Module):
            raise TypeError(f"DEQ needs an nn.Module cell with forward(z, x) -> z, got {type(cell).__name__}")
        self.cell = cell
        self._problem_cls = fixed_point_class(cell)
        chosen = solver is not None
        solver = default_solver(cell) if solver is None else solver
        if max_iter is None:
            monotone_default = not chosen and solver == "peaceman_rachford"
            max_iter = MONOTONE_DEFAULT_MAX_ITER if monotone_default else DEFAULT_MAX_ITER
        self._solver = get_solver(solver)
        self._bsolver = get_solver(solver if backward_solver is None else backward_solver)
        if not self._problem_cls.structured:
            for role, s in (("solver", self._solver), ("backward_solver", self._bsolver)):
                if requires_problem(s):
                    raise ValueError(f"{role}={s.__name__!r} is a splitting solver, which needs a ReLU-affine "
                                     f"cell; {type(cell).__name__} is a generic cell: use one of "
                                     f"{', '.join(map(repr, generic_solver_names()))}")
        self.solver = solver
        self.backward_solver = solver if backward_solver is None else backward_solver
        self.tol = _check_tol("tol", tol)
        self.max_iter = _check_iters("max_iter", max_iter)
        self.backward_tol = self.tol if backward_tol is None else _check_tol("backward_tol", backward_tol)
        self.backward_max_iter = (self.max_iter if backward_max_iter is None
                                  else _check_iters("backward_max_iter", backward_max_iter))
        if on_nonconvergence not in ON_NONCONVERGENCE:
            raise ValueError(f"on_nonconvergence={on_nonconvergence!r} is not one of {ON_NONCONVERGENCE}")
        self.on_nonconvergence = on_nonconvergence
        self.implicit = bool(implicit)
        fwd, bwd = solver_options(self._solver), solver_options(self._bsolver)
        unknown = sorted(set(solver_opts) - set(fwd) - set(bwd))
        if unknown:
            raise ValueError(f"unknown solver option(s) {unknown} for solver={solver!r} / "
                             f"backward_solver={self.backward_solver!r}; valid options: "
                             f"{sorted(set(fwd) | set(bwd))}")
        self.solver_opts = dict(solver_opts)
        self._fopts = {k: v for k, v in solver_opts.items() if k in fwd}
        self._bopts = {k: v for k, v in solver_opts.items() if k in bwd}
        self.last_stats = None
        self.last_backward_stats = None

    def forward(self, u, z0=None):
        if torch._C._get_tracing_state() is not None:  # auto_LiRPA is tracing: emit ONE node
            from ..bounds.node import traced_deq
            return traced_deq(self, u)
        return self.solve(u, z0=z0)

    @property
    def generic(self) -> bool:
        """True for a generic cell (any ``nn.Module``), False for a ReLU-affine one."""
        return not self._problem_cls.structured

    def problem(self, params: dict | None = None) -> FixedPointProblem:
        """The cell's :class:`~lirpa_deq.nn.fixed_point.FixedPointProblem` (operator built once);
        ``params`` as in :meth:`solve`."""
        return self._problem_cls(self.cell, params)

    def solve(self, u: torch.Tensor, params: dict | None = None, z0: torch.Tensor | None = None):
        """The fixed point for injection (input) ``u``; ``params`` overrides cell parameters
        (name -> tensor, keys of ``cell.named_parameters()``; gradients then reach those tensors).
        ``z0``: warm start of the state's shape (default zeros, or the previous solution under
        ``serial_warm_start``)."""
        check_dtype(u, params.values() if params else self.cell.parameters())
        problem = self.problem(params)
        warm = warm_start_state(self)
        z0, max_iter = self._start(u, z0, warm)
        problem.prepare(u, z0)
        policy = self.on_nonconvergence if warm is None else "ignore"
        if not self.implicit:  # differentiate through the solver's iterations
            z, stats = self._solver(problem.solver_map(u), z0, tol=self.tol, max_iter=max_iter,
                                    **self._fopts)
            self._record(stats, policy, "forward")
            out = problem.step(z, u)
        else:
            with torch.no_grad():
                z, stats = self._solver(problem.solver_map(u), z0.detach(), tol=self.tol,
                                        max_iter=max_iter, **self._fopts)
            self._record(stats, policy, "forward")
            z = z.detach()
            out = problem.step(z, u)
            if out.requires_grad:
                self._attach_adjoint(out, problem.adjoint(z, out, u), policy)
        if warm is not None:
            warm.prev = out.detach()
        return out

    # -- internals ----------------------------------------------------------------------------
    def _start(self, u, z0, warm):
        """(start state, iteration budget) of a solve for ``u``."""
        shape = self.state_shape(u.shape)
        if z0 is not None:
            if tuple(z0.shape) != shape:
                raise ValueError(f"z0 shape {tuple(z0.shape)} != state shape {shape}")
            return z0.to(dtype=u.dtype, device=u.device), self.max_iter
        if warm is not None:
            prev = warm.prev
            if prev is not None and tuple(prev.shape) == shape and prev.dtype == u.dtype \
                    and prev.device == u.device:
                return prev, warm.max_iter
        return torch.zeros(shape, dtype=u.dtype, device=u.device), self.max_iter

    def state_shape(self, x_shape):
        """Full shape of z* for an input of shape ``x_shape``."""
        return self._problem_cls.state_shape(self.cell, x_shape)

    def _attach_adjoint(self, out, system, policy):
        """Replace the gradient reaching ``out`` by the solution of the adjoint ``system``."""
        def adjoint_hook(grad):
            if grad is None:  # undefined gradient: nothing flows back
                return grad
            with torch.no_grad():
                h, stats = self._bsolver(system.map(grad), system.start(grad), tol=self.backward_tol,
                                         max_iter=self.backward_max_iter, **self._bopts)
                g = system.finish(grad, h)
            self._record(stats, policy, "backward")
            return g

        out.register_hook(adjoint_hook)

    def _record(self, stats, policy, phase):
        if phase == "forward":
            self.last_stats = stats
        else:
            self.last_backward_stats = stats
        if stats.converged or policy == "ignore":
            return
        tol = self.tol if phase == "forward" else self.backward_tol
        hint = self._problem_cls.nonconvergence_hint(stats.solver)
        msg = (f"DEQ {phase} solve with {stats.solver} did not converge: residual "
               f"{stats.residual:.3e} > tol {tol:g} after {stats.iterations} iterations. Hint: {hint}.")
        if policy == "raise":
            raise DEQConvergenceError(msg)
        warnings.warn(msg, DEQConvergenceWarning, stacklevel=4)

    def extra_repr(self):
        s = f"solver={self.solver!r}, tol={self.tol:g}, max_iter={self.max_iter}"
        if self.backward_solver != self.solver:
            s += f", backward_solver={self.backward_solver!r}"
        if not self.implicit:
            s += ", implicit=False"
        return s
