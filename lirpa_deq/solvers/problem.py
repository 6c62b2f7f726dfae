"""The structured fixed-point problem that the operator-splitting solvers need.

``ReLUAffineProblem`` describes ``z = prox(L z + b)`` where ``L`` is a cell's weight operator
``W`` (or its adjoint ``W^T`` for the backward pass) and ``prox`` is ``relu`` (forward) or
multiplication by a 0/1 mask ``D = diag(relu'(s*))`` (backward). Both ``prox`` are projections
(onto the nonnegative orthant / onto a coordinate subspace), hence proximal operators for any
step size, which is what forward-backward and Peaceman-Rachford splitting require.

The problem is itself callable (``problem(z)`` is the fixed-point map), so the generic solvers
accept it as their ``f`` as well.

The operator ``op`` is duck-typed (``lirpa_deq.nn.cells.WeightOperator``): ``W``, ``WT``,
``absW``, ``absWT``; optional ``matrix`` (dense ``(N, N)`` tensor or None), ``similarity``
(positive tensor broadcastable to the batched state, or None: ``W = S^-1 W0 S`` where
``I - W0 >= margin * I``) and ``norm_bound(state_shape)`` (a proven bound on ``||W||_2``).
"""
from __future__ import annotations

import torch


class ReLUAffineProblem:
    """``z = prox(L z + bias)``.

    op: the weight operator. bias: ``(B, *state)``; its shape is the state shape.
    margin: ``m`` with ``I - W0 >= m I`` (see ``similarity``), used for safe step sizes.
    transpose: use ``L = W^T`` (adjoint / backward system) instead of ``W``.
    mask: None for ``prox = relu``; a 0/1 tensor shaped like ``bias`` for ``prox(x) = mask * x``.
    """

    def __init__(self, op, bias: torch.Tensor, *, margin: float | None = None,
                 transpose: bool = False, mask: torch.Tensor | None = None):
        if mask is not None and mask.shape != bias.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != bias shape {tuple(bias.shape)}")
        self.op, self.bias, self.margin = op, bias, margin
        self.transpose, self.mask = transpose, mask

    @property
    def state_shape(self):
        return tuple(self.bias.shape[1:])

    def lin(self, z):
        return self.op.WT(z) if self.transpose else self.op.W(z)

    def lin_t(self, z):
        return self.op.W(z) if self.transpose else self.op.WT(z)

    def abs_lin(self, z):
        return self.op.absWT(z) if self.transpose else self.op.absW(z)

    def abs_lin_t(self, z):
        return self.op.absW(z) if self.transpose else self.op.absWT(z)

    def prox(self, x):
        return torch.relu(x) if self.mask is None else self.mask * x

    def __call__(self, z):
        return self.prox(self.lin(z) + self.bias)

    def matrix(self):
        """Dense ``(N, N)`` matrix of ``L`` when the operator carries one, else None."""
        M = getattr(self.op, "matrix", None)
        if M is None:
            return None
        return M.transpose(0, 1) if self.transpose else M

    def scale(self):
        """``s`` with ``L = S^-1 L0 S``, ``I - L0`` monotone; None means ``S = I``.

        For the adjoint, ``W^T = S W0^T S^-1``, so the scale is ``1 / s``.
        """
        s = getattr(self.op, "similarity", None)
        if s is None:
            return None
        return 1.0 / s if self.transpose else s

    def norm_bound(self):
        """Proven upper bound on ``||L||_2`` from the operator, or None if it has none."""
        fn = getattr(self.op, "norm_bound", None)
        return None if fn is None else fn(self.state_shape)
