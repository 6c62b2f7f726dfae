"""Monotone operator cells (Winston & Kolter 2020): ``W = (1 - m) I - A^T A + B - B^T``.

Guarantee ('monotone'): ``sym(I - W) = m I + A^T A >= m I`` for ANY raw ``A``, ``B``
(``B - B^T`` is skew and drops out of the symmetric part), so the DEQ has a unique fixed
point for every input and forward-backward / Peaceman-Rachford converge. ``DEQ(cell)`` therefore
defaults to Peaceman-Rachford for these cells, with the step minimising its proven contraction
factor given ``m``, ``lambda_max(m I + A^T A)`` and ``||B - B^T||`` (``lirpa_deq.solvers.steps``);
plain Anderson (the default elsewhere) stalls once ``||I - W|| / m`` is large.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._shapes import conv_check_shape, validate_conv, validate_fc
from .base import MatrixOperator, ReLUAffineCell, check_min_eig_sym_i_minus
from .conv_ops import MonConvOperator


def _check_m(m):
    if not (isinstance(m, (int, float)) and m > 0):
        raise ValueError(f"monotonicity margin m must be a number > 0, got {m!r}")
    return float(m)


class MonLinear(ReLUAffineCell):
    """Fully connected monotone cell on states ``(B, n)``.

    Parameters ``A``, ``B``: ``(n, n)``, unconstrained. ``absW`` is exact (dense ``|W|``).
    """

    guarantee = "monotone"

    def __init__(self, n: int, m: float = 0.5, *, device=None, dtype=None):
        super().__init__()
        self.n, self.margin = int(n), _check_m(m)
        fk = dict(device=device, dtype=dtype)
        bound = 1 / math.sqrt(n)  # nn.Linear-like scale keeps ||A^T A|| = O(1)
        self.A = nn.Parameter(torch.empty(n, n, **fk).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.empty(n, n, **fk).uniform_(-bound, bound))

    def _build_operator(self, p):
        A, B = p["A"], p["B"]
        eye = torch.eye(self.n, dtype=A.dtype, device=A.device)
        return MatrixOperator((1 - self.margin) * eye - A.transpose(0, 1) @ A + B - B.transpose(0, 1))

    def _validate_state(self, shape):
        validate_fc(self, shape)

    def _check(self, shape, tol):
        return check_min_eig_sym_i_minus(self.operator().dense(), self.margin, tol)

    def extra_repr(self):
        return f"n={self.n}, m={self.margin}"


class MonConv2d(ReLUAffineCell):
    """Conv monotone cell on states ``(B, C, H, W)``, any ``H, W``.

    ``A``, ``B``: ``(C, C, 3, 3)`` zero-padded convs, ``A^T`` = ``conv_transpose2d``.
    ``absW`` is an elementwise UPPER bound (see :class:`MonConvOperator`).
    """

    guarantee = "monotone"

    def __init__(self, channels: int, m: float = 0.5, *, device=None, dtype=None):
        super().__init__()
        self.channels, self.margin = int(channels), _check_m(m)
        fk = dict(device=device, dtype=dtype)
        bound = 1 / math.sqrt(9 * channels)  # fan-in scaling of a 3x3 conv
        self.A = nn.Parameter(torch.empty(channels, channels, 3, 3, **fk).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.empty(channels, channels, 3, 3, **fk).uniform_(-bound, bound))

    def _build_operator(self, p):
        return MonConvOperator(p["A"], p["B"], self.margin)

    def _validate_state(self, shape):
        validate_conv(self, shape)

    def _check(self, shape, tol):
        shape = conv_check_shape(self, shape)
        return check_min_eig_sym_i_minus(self.operator().dense(shape), self.margin, tol)

    def extra_repr(self):
        return f"channels={self.channels}, m={self.margin}"
