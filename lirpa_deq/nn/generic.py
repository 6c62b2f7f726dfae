"""The point solve of a DEQ with a GENERIC cell ``z_next = cell(z, x)`` (any nn.Module).

Forward: ``z* = cell(z*, x)`` by a generic registered solver (anderson / broyden /
fixed_point_iter) under ``torch.no_grad()``. Gradients are implicit, as in the DEQ tutorial of
Kolter, Duvenaud and Johnson: one differentiable cell step ``out = cell(z*, x)`` at the detached
fixed point carries gradients to ``x`` and the cell parameters, and a hook on ``out`` replaces its
incoming gradient ``grad`` by the solution of ``g = grad + J^T g`` (``J = d cell / d z`` at z*),
computed with vector-Jacobian products of a second, z-differentiable evaluation of the cell.
"""
from __future__ import annotations

import torch
from torch.func import functional_call


def generic_state_shape(cell, x_shape):
    """Full shape of z for an input of shape ``x_shape``: ``cell.state_shape(x_shape)`` when the
    cell defines it, else x's shape."""
    fn = getattr(cell, "state_shape", None)
    return tuple(fn(tuple(x_shape))) if callable(fn) else tuple(x_shape)


def cell_map(cell, x, params=None):
    """``z -> cell(z, x)``, with the cell's parameters optionally overridden by ``params``."""
    if params:
        return lambda z: functional_call(cell, params, (z, x))
    return lambda z: cell(z, x)


def _first_step(f, z, cell):
    """f(z0) with an error that names the likely cause when the cell cannot take z's shape."""
    try:
        return f(z)
    except RuntimeError as err:
        raise ValueError(f"{type(cell).__name__}(z, x) failed on a state z of shape {tuple(z.shape)}: {err}. "
                         "The state has x's shape unless the cell defines state_shape(x_shape) -> z_shape.") from err


def _check_output(z, fz, cell):
    if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
        got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
        raise ValueError(f"a DEQ cell must map z of shape {tuple(z.shape)} to the same shape, but "
                         f"{type(cell).__name__}(z, x) returned {got}. Define cell.state_shape(x_shape) "
                         "when z and x differ in shape.")


def generic_solve(deq, x, params, z0, max_iter, policy):
    """The fixed point of ``deq.cell`` for input ``x`` (see module doc). Returns z* (with the
    implicit-gradient hook attached when gradients are needed)."""
    cell = deq.cell
    f = cell_map(cell, x, params)
    if not deq.implicit:
        _check_output(z0, _first_step(f, z0, cell), cell)
        z, stats = deq._solver(f, z0, tol=deq.tol, max_iter=max_iter, **deq._fopts)
        deq._record(stats, policy, "forward")
        return f(z)
    with torch.no_grad():
        _check_output(z0, _first_step(f, z0, cell), cell)
        z, stats = deq._solver(f, z0.detach(), tol=deq.tol, max_iter=max_iter, **deq._fopts)
    deq._record(stats, policy, "forward")
    z = z.detach()
    out = f(z)
    if out.requires_grad:
        _attach_generic_adjoint(deq, f, z, out, policy)
    return out


def _attach_generic_adjoint(deq, f, z, out, policy):
    z_in = z.clone().requires_grad_()
    with torch.enable_grad():
        f_in = f(z_in)  # separate graph for the vector-Jacobian products J^T v

    def adjoint_hook(grad):
        if grad is None:
            return grad

        def T(g):  # g -> grad + J^T g
            (vjp,) = torch.autograd.grad(f_in, z_in, g, retain_graph=True)
            return grad + vjp

        g, stats = deq._bsolver(T, grad, tol=deq.backward_tol, max_iter=deq.backward_max_iter,
                                **deq._bopts)
        deq._record(stats, policy, "backward")
        return g.detach()

    out.register_hook(adjoint_hook)
