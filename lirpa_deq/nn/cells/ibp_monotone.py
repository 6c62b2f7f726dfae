"""IBP-MonDEQ cells (Wei & Kolter 2022): the interval system is itself a monotone DEQ.

``M`` is unconstrained; ``d_i = (sum_j |M_ij| + sum_j |M_ji|) / (2 (1 - m)) + 1e-8``;
``W0 = D^-1/2 M D^-1/2``; optionally ``W = S^-1 W0 S`` with ``S = diag(exp(s))`` (per unit,
or per channel for conv), else ``W = W0``.

Guarantee ('interval-monotone'): ``sym(|W0|) <= (1 - m) I``. Proof: with ``y = D^-1/2 x``,
``x^T |W0| x = sum_ij |M_ij| y_i y_j <= sum_ij |M_ij| (y_i^2 + y_j^2) / 2
= sum_i x_i^2 (r_i + c_i) / (2 d_i) <= (1 - m) ||x||^2``. Consequences: ``I - W0 >= m I``
(monotone), the doubled interval matrix is monotone, and ``rho(|W|) = rho(|W0|) <= 1 - m``.
With the similarity, the statement holds in the coordinates ``y = S z`` (the operator
exposes ``similarity = exp(s)``; the splitting solvers iterate there). ``absW`` is exact:
``|W| = S^-1 D^-1/2 |M| D^-1/2 S`` because the scalings are positive diagonal.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._shapes import conv_check_shape, validate_conv, validate_fc
from .base import MatrixOperator, ReLUAffineCell, check_max_eig_sym_abs
from .conv_ops import ScaledConvOperator, conv3x3, conv3x3_t

DIAG_EPS = 1e-8  # keeps D invertible when a row and column of M vanish


def _check_m(m):
    if isinstance(m, bool) or not (isinstance(m, (int, float)) and 0 < m < 1):
        raise ValueError(f"IBP-MonDEQ margin m must be in (0, 1), got {m!r}")
    return float(m)


def _check_unscaled(cell, Wd, s_vec, tol):
    """Check ``sym(|S W S^-1|) <= (1 - m) I`` from the dense ``W`` (``s_vec``: per-unit log-scale)."""
    if s_vec is not None:
        S = s_vec.double().exp()
        Wd = S[:, None] * Wd.double() / S[None, :]
    return check_max_eig_sym_abs(Wd, 1 - cell.margin, tol, "lambda_max(sym(|W0|)) <= 1 - m")


class IBPMonLinear(ReLUAffineCell):
    """Fully connected IBP-MonDEQ cell on ``(B, n)``. Parameters: ``M (n, n)``, and
    ``s (n,)`` when ``similarity=True``. ``absW`` is exact."""

    guarantee = "interval-monotone"
    _check_margin = staticmethod(_check_m)

    def __init__(self, n: int, m: float = 0.5, similarity: bool = False, *, device=None, dtype=None):
        super().__init__()
        self.n, self.margin, self.similarity = int(n), _check_m(m), bool(similarity)
        fk = dict(device=device, dtype=dtype)
        bound = 1 / math.sqrt(n)
        self.M = nn.Parameter(torch.empty(n, n, **fk).uniform_(-bound, bound))
        if self.similarity:
            self.s = nn.Parameter(torch.zeros(n, **fk))

    def _build_operator(self, p):
        M = p["M"]
        absM = M.abs()
        d = (absM.sum(1) + absM.sum(0)) / (2 * (1 - self.margin)) + DIAG_EPS
        dinv = d.rsqrt()
        W = dinv[:, None] * M * dinv[None, :]
        if not self.similarity:
            return MatrixOperator(W)
        S = p["s"].exp()
        return MatrixOperator(W * S[None, :] / S[:, None], similarity=S)

    def _validate_state(self, shape):
        validate_fc(self, shape)

    def _check(self, shape, tol):
        s = self.s if self.similarity else None
        return _check_unscaled(self, self.operator().dense(), s, tol)

    def extra_repr(self):
        return f"n={self.n}, m={self.margin}, similarity={self.similarity}"


class IBPMonConv2d(ReLUAffineCell):
    """Conv IBP-MonDEQ cell on ``(B, C, H, W)``: ``M`` is a zero-padded 3x3 conv
    ``(C, C, 3, 3)``; ``D`` is per channel AND pixel (row sums ``conv(1, |M|)``, column sums
    ``conv_transpose(1, |M|)``), so it depends on the image size and is computed for the size
    at hand. ``s (C,)`` when ``similarity=True``. ``absW`` is exact."""

    guarantee = "interval-monotone"
    _check_margin = staticmethod(_check_m)

    def __init__(self, channels: int, m: float = 0.5, similarity: bool = False, *,
                 device=None, dtype=None):
        super().__init__()
        self.channels, self.margin = int(channels), _check_m(m)
        self.similarity = bool(similarity)
        fk = dict(device=device, dtype=dtype)
        bound = 1 / math.sqrt(9 * channels)
        self.M = nn.Parameter(torch.empty(channels, channels, 3, 3, **fk).uniform_(-bound, bound))
        if self.similarity:
            self.s = nn.Parameter(torch.zeros(channels, **fk))

    def _build_operator(self, p):
        K, m = p["M"], self.margin
        S = p["s"].exp().view(1, -1, 1, 1) if self.similarity else None

        def scales(H, W):
            absK = K.abs()
            ones = K.new_ones(1, K.shape[1], H, W)
            d = (conv3x3(ones, absK) + conv3x3_t(ones, absK)) / (2 * (1 - m)) + DIAG_EPS
            dinv = d.rsqrt()
            return (dinv, dinv) if S is None else (dinv / S, dinv * S)

        return ScaledConvOperator(K, scales, similarity=S)

    def _validate_state(self, shape):
        validate_conv(self, shape)

    def _check(self, shape, tol):
        shape = conv_check_shape(self, shape)
        s = None
        if self.similarity:
            s = self.s.view(-1, 1, 1).expand(shape).reshape(-1)
        return _check_unscaled(self, self.operator().dense(shape), s, tol)

    def extra_repr(self):
        return f"channels={self.channels}, m={self.margin}, similarity={self.similarity}"
