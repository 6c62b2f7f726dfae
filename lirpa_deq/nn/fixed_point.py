"""The fixed-point problem of a DEQ cell: what every point solve needs, for both cell families.

``problem = fixed_point_problem(cell, params)`` binds a cell (and optionally overriding parameter
tensors) once; the cell's operator is built then and re-used for every injection ``u``:

* ``problem.solver_map(u)``: the ``f`` handed to a registered solver, ``z -> cell(z, u)``
  (a :class:`~lirpa_deq.solvers.ReLUAffineProblem` for ReLU-affine cells, so splitting solvers
  apply; a plain callable for generic cells);
* ``problem.step(z, u)``: ONE differentiable cell application at ``z`` (carries gradients to ``u``
  and the parameters);
* ``problem.adjoint(z, out, u)``: the implicit-gradient system at the fixed point, an
  :class:`AdjointSystem` whose ``map(grad)`` is the ``f`` of the backward solve and whose
  ``finish`` turns its solution into ``d loss / d out``.

:class:`~lirpa_deq.nn.DEQ` (forward and backward), the interval search's warm start (through
``DEQ.solve``) and the serialized smoothing pass (``lirpa_deq.smoothing.fastpath``) all solve
through this object. A new cell family adds one subclass and one ``register_fixed_point`` line.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.func import functional_call

from ..solvers import ReLUAffineProblem
from .cells.base import ReLUAffineCell


@dataclasses.dataclass
class AdjointSystem:
    """The backward solve of a DEQ: ``h = map(grad)(h)`` from ``start(grad)``, then
    ``d loss / d out = finish(grad, h)``. Every function runs under ``torch.no_grad()``."""

    map: Callable
    start: Callable
    finish: Callable


class FixedPointProblem:
    """``z = cell(z, u)`` for one cell with fixed parameters (see the module doc).

    structured: True when splitting solvers (``requires_problem``) apply to ``solver_map``.
    """

    structured = False

    def __init__(self, cell, params: dict | None = None):
        self.cell, self.params = cell, params

    @staticmethod
    def state_shape(cell, x_shape) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, u, z0):
        """Validate the injection ``u`` and the start ``z0`` (both state-shaped) before a solve."""

    def solver_map(self, u):  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, z, u):  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, z, out, u) -> AdjointSystem:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def nonconvergence_hint(solver: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class ReLUAffineFixedPoint(FixedPointProblem):
    """``z = relu(W z + u)`` for a :class:`ReLUAffineCell`; the operator is built once, here.

    The adjoint ``g = grad + J^T g`` with ``J = D W``, ``D = diag(relu'(W z* + u))`` is solved
    in the form ``h = D g``: ``h = D (W^T h + grad)`` (a ReLU-affine problem with a 0/1 mask as
    nonlinearity, so every solver, splitting included, applies) and ``g = grad + W^T h``.
    """

    structured = True

    def __init__(self, cell, params: dict | None = None):
        super().__init__(cell, params)
        self.op = cell.operator(params)
        self.margin = cell.margin
        self._prepared = None

    @staticmethod
    def state_shape(cell, x_shape):
        return cell.state_shape(x_shape)

    def prepare(self, u, z0):
        shape = tuple(u.shape[1:])
        if shape != self._prepared:  # size-dependent pieces built once per shape, with grad
            self.cell.state_shape(u.shape)
            self.op.prepare(shape)
            self._prepared = shape

    def solver_map(self, u):
        return ReLUAffineProblem(self.op, u, margin=self.margin)

    def step(self, z, u):
        return self.cell.step(z, u, self.op)

    def adjoint(self, z, out, u):
        mask = (out.detach() > 0).to(out.dtype)  # relu'(s*) exactly as autograd uses it
        op, margin = self.op, self.margin
        return AdjointSystem(
            map=lambda grad: ReLUAffineProblem(op, grad, margin=margin, transpose=True, mask=mask),
            start=lambda grad: mask * grad,
            finish=lambda grad, h: grad + op.WT(h))

    @staticmethod
    def nonconvergence_hint(solver):
        if solver == "peaceman_rachford":
            return ("raise max_iter (Peaceman-Rachford converges for every monotone cell, at a "
                    "rate set by the conditioning ||I - W|| / m), or check the cell's margin "
                    "(cell.check())")
        return ("raise max_iter, use solver='peaceman_rachford' (converges for every monotone "
                "cell), or check the cell's margin (cell.check())")


class GenericFixedPoint(FixedPointProblem):
    """``z = cell(z, x)`` for ANY ``nn.Module`` cell (``forward(z, x) -> z``).

    The adjoint ``g = grad + J^T g`` (``J = d cell / d z`` at z*) is solved with vector-Jacobian
    products of a second, z-differentiable evaluation of the cell at the fixed point.
    """

    @staticmethod
    def state_shape(cell, x_shape):
        """``cell.state_shape(x_shape)`` when the cell defines it, else x's shape."""
        fn = getattr(cell, "state_shape", None)
        return tuple(fn(tuple(x_shape))) if callable(fn) else tuple(x_shape)

    def solver_map(self, x):
        if self.params:
            return lambda z: functional_call(self.cell, self.params, (z, x))
        return lambda z: self.cell(z, x)

    def step(self, z, x):
        return self.solver_map(x)(z)

    def prepare(self, x, z0):
        """One cell call on ``z0``, with an error that names the likely cause when the cell cannot
        take z's shape or does not return it."""
        name = type(self.cell).__name__
        with torch.no_grad():
            try:
                fz = self.step(z0, x)
            except RuntimeError as err:
                raise ValueError(f"{name}(z, x) failed on a state z of shape {tuple(z0.shape)}: {err}. The "
                                 "state has x's shape unless the cell defines state_shape(x_shape) -> "
                                 "z_shape.") from err
        if not isinstance(fz, torch.Tensor) or fz.shape != z0.shape:
            got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
            raise ValueError(f"a DEQ cell must map z of shape {tuple(z0.shape)} to the same shape, but "
                             f"{name}(z, x) returned {got}. Define cell.state_shape(x_shape) when z and x "
                             "differ in shape.")

    def adjoint(self, z, out, x):
        z_in = z.detach().clone().requires_grad_()
        with torch.enable_grad():
            f_in = self.step(z_in, x)  # separate graph for the vector-Jacobian products J^T v

        def system(grad):
            def T(g):  # g -> grad + J^T g
                (vjp,) = torch.autograd.grad(f_in, z_in, g, retain_graph=True)
                return grad + vjp
            return T

        return AdjointSystem(map=system, start=lambda grad: grad, finish=lambda grad, g: g.detach())

    @staticmethod
    def nonconvergence_hint(solver):
        return ("raise max_iter, or check that the cell is a contraction in z "
                "(lirpa_deq.bounds.generic.graph_lipschitz)")


_FAMILIES: list = []  # (cell type, problem class), most specific first


def register_fixed_point(cell_type: type, problem_cls: type, *, first: bool = True):
    """Solve cells of ``cell_type`` (subclasses included) with ``problem_cls`` (a
    :class:`FixedPointProblem` subclass). Cells of no registered type are generic."""
    if not (isinstance(problem_cls, type) and issubclass(problem_cls, FixedPointProblem)):
        raise TypeError(f"problem_cls must subclass FixedPointProblem, got {problem_cls!r}")
    entry = (cell_type, problem_cls)
    _FAMILIES.insert(0, entry) if first else _FAMILIES.append(entry)


def fixed_point_class(cell) -> type:
    """The :class:`FixedPointProblem` subclass that solves ``cell``."""
    for cell_type, cls in _FAMILIES:
        if isinstance(cell, cell_type):
            return cls
    return GenericFixedPoint


def fixed_point_problem(cell, params: dict | None = None) -> FixedPointProblem:
    """The fixed-point problem of ``cell`` with its parameters (or ``params``: name -> tensor,
    keys of ``cell.named_parameters()``, which gradients then reach)."""
    return fixed_point_class(cell)(cell, params)


register_fixed_point(ReLUAffineCell, ReLUAffineFixedPoint)
