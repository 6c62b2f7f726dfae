"""Step sizes for the splitting solvers from proved bounds on the monotone operator.

Setting: ``M = I - L0`` with ``sym(M) = S``, ``skew(M) = K`` and proved scalars
``m I <= S <= s_max I``, ``||K||_2 <= k``, ``||M||_2 <= lip`` (:class:`MonotoneBounds`).
For a unit vector ``d`` let ``t = <d, M d> = <d, S d>`` (in ``[m, s_max]``) and
``s = ||M d||^2``. Then ``s <= sigma(t)^2`` with
``sigma(t) = min(lip, sqrt((m + s_max) t - m s_max) + k)``, because
``||M d|| <= ||S d|| + ||K d||`` and ``(S - m)(S - s_max) <= 0`` gives
``<d, S^2 d> <= (m + s_max) t - m s_max``.

Forward-backward, ``y <- prox(y - a (M y - b))``: ``prox`` is a projection (1-Lipschitz), so
the map is Lipschitz with ``q(a)^2 <= sup_t 1 - 2 a t + a^2 sigma(t)^2`` (:func:`fb_rate`).
With ``sigma = lip`` and ``t = m`` this is the classical ``1 - 2 a m + a^2 lip^2``, below 1 for
``a < 2 m / lip^2``.

Peaceman-Rachford, ``v <- R_A(R_B(v))`` with ``R_X = 2 J_X - I``, ``J_A = (I + a M)^-1``
(affine part) and ``J_B = prox``. ``R_B`` is nonexpansive; for ``R_A`` write ``p = (I + a M) d``,
``R_A p = (I - a M) d``, so ``||R_A p||^2 / ||p||^2 = (1 - 2 a t + a^2 s) / (1 + 2 a t + a^2 s)``
and ``v`` contracts with ``delta(a)^2 <= sup_t 1 - 4 a t / (1 + 2 a t + a^2 sigma(t)^2)``
(:func:`pr_rate`). With only ``m`` and ``lip`` this is
``delta(a)^2 <= (1 - 2 a m + a^2 lip^2) / (1 + 2 a m + a^2 lip^2)``, minimised by ``a = 1 / lip``
with ``delta = sqrt((lip - m) / (lip + m))``; for symmetric ``M`` (``k = 0``) the sup sits at
``t in {m, s_max}`` and the minimiser is ``a = 1 / sqrt(m s_max)`` with
``delta = (sqrt(kappa) - 1) / (sqrt(kappa) + 1)``, ``kappa = s_max / m``. Since
``y_k = prox(v_k)``, ``||y_k - y*|| <= delta^k ||v_0 - v*||``.

Both sups are taken rigorously over a geometric grid of ``t``-cells ``[t_i, t_{i+1}]``: the
numerator's ``t`` at the left end, the denominator's ``t`` and ``sigma`` (nondecreasing) at the
right end, so the returned factors are upper bounds (up to float64 rounding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_T_CELLS = 1024
_A_POINTS = 241


@dataclass(frozen=True)
class MonotoneBounds:
    """Proved bounds on ``M = I - L0`` (see module docstring); ``l0 >= ||L0||_2``.

    m: margin, ``sym(M) >= m I`` (``> 0``). sym_max: ``sym(M) <= sym_max I``. skew:
    ``||skew(M)||_2``. lip: ``||M||_2``. All are upper bounds except ``m`` (a lower bound).
    """

    m: float
    sym_max: float
    skew: float
    lip: float
    l0: float

    def __post_init__(self):
        if not self.m > 0:
            raise ValueError(f"MonotoneBounds needs m > 0, got {self.m!r}")
        for k in ("sym_max", "skew", "lip", "l0"):
            v = getattr(self, k)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"MonotoneBounds.{k} must be finite and >= 0, got {v!r}")


def _tight(b: MonotoneBounds):
    """Consistent values: ``m <= sym_max <= lip``."""
    lip = max(b.lip, b.m)
    return b.m, min(max(b.sym_max, b.m), lip), b.skew, lip


def _cells(b: MonotoneBounds):
    """Left / right ends of the t-cells and ``sigma^2`` at the right ends, float64 ``(T,)``."""
    m, smax, k, lip = _tight(b)
    t = m * (smax / m) ** torch.linspace(0, 1, _T_CELLS + 1, dtype=torch.float64)
    t[0], t[-1] = m, smax
    tl, tr = t[:-1], t[1:]
    sig = ((m + smax) * tr - m * smax).clamp_min(0).sqrt() + k
    return tl, tr, sig.clamp_max(lip) ** 2


def pr_rate(a, b: MonotoneBounds):
    """Proved contraction factor of Peaceman-Rachford's ``v`` iteration for step(s) ``a``.

    a: float or float64 tensor ``(P,)``; returns the same kind (factor in ``[0, 1)``).
    """
    tl, tr, s2 = _cells(b)
    at = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
    h = 4 * at * tl / (1 + 2 * at * tr + at * at * s2)
    out = (1 - h.min(dim=1).values).clamp(0, 1).sqrt()
    return float(out[0]) if not torch.is_tensor(a) else out


def fb_rate(a, b: MonotoneBounds):
    """Proved Lipschitz constant of the forward-backward map for step(s) ``a`` (may be >= 1)."""
    tl, tr, s2 = _cells(b)
    at = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
    q2 = (1 - 2 * at * tl + at * at * s2).max(dim=1).values
    out = q2.clamp_min(0).sqrt()
    return float(out[0]) if not torch.is_tensor(a) else out


def _argmin(rate, lo: float, hi: float, b: MonotoneBounds):
    grid = torch.logspace(math.log10(lo), math.log10(hi), _A_POINTS, dtype=torch.float64)
    r = rate(grid, b)
    i = int(torch.argmin(r))
    return float(grid[i]), float(r[i])


def pr_alpha(b: MonotoneBounds) -> float:
    """The step minimising :func:`pr_rate` (searched on ``[0.1 / lip, 10 / m]``)."""
    _, _, _, lip = _tight(b)
    return _argmin(pr_rate, 0.1 / lip, 10 / b.m, b)[0]


def fb_alpha(b: MonotoneBounds) -> float:
    """The step minimising :func:`fb_rate` over ``(0, 2 m / lip^2]`` (classical safe range), or
    ``1`` when ``l0 < 1`` certifies plain iteration with a smaller factor (contractive cells).

    The classical minimiser ``m / lip^2`` (factor ``sqrt(1 - m^2 / lip^2)``) is a grid point,
    so the result is never worse than it.
    """
    m, _, _, lip = _tight(b)
    a_max = 2 * m / lip ** 2
    a, q = _argmin(fb_rate, a_max / 1000, a_max, b)
    a0 = m / lip ** 2
    q0 = fb_rate(a0, b)
    if q0 <= q:
        a, q = a0, q0
    return 1.0 if b.l0 < q else a
