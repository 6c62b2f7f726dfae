"""monDEQ operator-splitting solvers (Winston & Kolter 2020) for ``z = prox(L z + b)``.

Both need the cell structure, i.e. a :class:`ReLUAffineProblem`, and a monotone operator:
``I - L0 >= m I`` with ``L = S^-1 L0 S`` (``S`` positive diagonal, identity for most cells).
Since ``prox`` (relu, or a 0/1 mask) commutes with positive diagonal scaling, the solvers
iterate on ``y = S z``, where ``y = prox(L0 y + S b)`` is monotone, and report residuals and
results in ``z``. Residuals are those of the DEQ map ``problem(z)`` (same as every solver).

- forward-backward: ``y <- prox((1 - a) y + a (L0 y + S b))``; converges for
  ``0 < a < 2 m / ||I - L0||^2``. Default (:func:`default_fb_alpha`): ``a = m / B^2`` with
  ``B`` a proven bound on ``||I - L0||_2`` (proven factor ``sqrt(1 - m^2 / B^2)``), or
  ``a = 1`` when a proven ``||L0||_2`` bound is smaller than that factor (contractive cells).
- Peaceman-Rachford: with ``V = ((1 + a) I - a L0)^-1``, state ``(y, v)``:
  ``u = 2y - v; y_h = V(u + a S b); v = 2 y_h - u; y = prox(v)``. Converges for every
  ``a > 0``; ``v`` is initialised as ``y0 + a (L0 y0 + S b - y0)`` so that a warm start at
  the fixed point is already stationary.
"""
from __future__ import annotations

import math

import torch

from ._common import check_common
from .linear import dense_resolvent, iterative_resolvent
from .problem import ReLUAffineProblem
from .stats import Tracker, batch_mask, per_sample_residual


def _require_problem(problem, name):
    if not isinstance(problem, ReLUAffineProblem):
        raise TypeError(f"{name} needs the cell structure: pass a lirpa_deq.solvers."
                        f"ReLUAffineProblem (lirpa_deq.nn.DEQ does this), not {type(problem).__name__}")


class _MonotoneForm:
    """The problem in ``y = S z`` coordinates (see module docstring)."""

    def __init__(self, problem: ReLUAffineProblem):
        self.p, self.s = problem, problem.scale()
        self.bias = problem.bias if self.s is None else self.s * problem.bias

    def to_y(self, z):
        return z if self.s is None else self.s * z

    def to_z(self, y):
        return y if self.s is None else y / self.s

    def lin(self, y):
        return self.p.lin(y) if self.s is None else self.s * self.p.lin(y / self.s)

    def lin_t(self, y):
        return self.p.lin_t(y) if self.s is None else self.p.lin_t(self.s * y) / self.s

    def matrix(self):
        L = self.p.matrix()
        if L is None or self.s is None:
            return L
        sv = self.s.expand((1,) + self.p.state_shape).reshape(-1)
        return sv[:, None] * L / sv[None, :]

    def residual(self, y, pre):
        """Per-sample residual in z coordinates, given ``pre = L0 y + S b``."""
        return per_sample_residual(self.to_z(y), self.to_z(self.p.prox(pre)))

    @torch.no_grad()
    def l0_norm_bound(self) -> float:
        """A proven upper bound on ``||L0||_2`` (exact for dense operators)."""
        L = self.matrix()
        if L is not None:
            return float(torch.linalg.matrix_norm(L.detach(), ord=2))
        if self.s is None:
            nb = self.p.norm_bound()
            if nb is not None:
                return float(nb)
        # Schur test on |L0| = S |L| S^-1: ||L0||_2 <= sqrt(max row sum * max column sum).
        b = self.p.bias
        one = torch.ones((1,) + tuple(b.shape[1:]), dtype=b.dtype, device=b.device)
        s = one if self.s is None else self.s.detach() * one
        rows = (s * self.p.abs_lin(one / s)).max()
        cols = (self.p.abs_lin_t(s) / s).max()
        return math.sqrt(float(rows) * float(cols))

    @torch.no_grad()
    def i_minus_l0_norm_bound(self, l0_bound: float) -> float:
        """A proven upper bound on ``||I - L0||_2`` (exact for dense operators)."""
        L = self.matrix()
        if L is None:
            fn = getattr(self.p.op, "i_minus_w_norm_bound", None)
            if self.s is None and fn is not None:  # ||I - W^T|| = ||I - W||
                return min(1.0 + l0_bound, float(fn(self.p.state_shape)))
            return 1.0 + l0_bound
        eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        return float(torch.linalg.matrix_norm(eye - L.detach(), ord=2))


def default_fb_alpha(problem: ReLUAffineProblem) -> float:
    """A forward-backward step with a proven contraction factor (see module docstring).

    Two certificates for the FB map's Lipschitz constant ``q(a)``: monotonicity gives
    ``q(a)^2 <= 1 - 2 a m + a^2 B^2`` (``B >= ||I - L0||``), minimised by ``a = m / B^2``;
    and for ``a = 1`` the map is ``prox(L0 y + b)`` with ``q <= ||L0||``. The step with the
    smaller certified ``q`` is returned. Needs ``problem.margin > 0``.
    """
    m = problem.margin
    if m is None or not m > 0:
        raise ValueError("forward_backward needs either alpha=... or a problem with a "
                         f"monotonicity margin > 0 (got margin={m!r})")
    mf = _MonotoneForm(problem)
    nb = mf.l0_norm_bound()
    B = mf.i_minus_l0_norm_bound(nb)
    a, q = float(m) / B ** 2, math.sqrt(max(0.0, 1 - (float(m) / B) ** 2))
    return 1.0 if nb < q else a


def forward_backward(problem, z0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 50,
                     alpha: float | None = None):
    """Forward-backward splitting. problem: :class:`ReLUAffineProblem`; z0: ``(B, *state)``.

    alpha: step size; None picks a proven-convergent step (:func:`default_fb_alpha`; can be
    slow for monotone but non-contractive cells). Returns ``(z, SolverStats)``.
    """
    _require_problem(problem, "forward_backward")
    check_common(tol, max_iter)
    a = default_fb_alpha(problem) if alpha is None else float(alpha)
    if not a > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    mf, tr = _MonotoneForm(problem), Tracker(tol, "forward_backward")
    y = mf.to_y(z0)
    pre = mf.lin(y) + mf.bias
    tr.observe(z0, mf.residual(y, pre))
    while not tr.done() and tr.iterations < max_iter:
        y_new = problem.prox(y + a * (pre - y))
        y = torch.where(batch_mask(tr.active, y), y_new, y)
        tr.iterations += 1
        pre = mf.lin(y) + mf.bias
        tr.observe(mf.to_z(y), mf.residual(y, pre))
    return tr.result()


def peaceman_rachford(problem, z0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 50,
                      alpha: float = 1.0, cg_tol: float | None = None, cg_max_iter: int = 100):
    """Peaceman-Rachford splitting. problem: :class:`ReLUAffineProblem`; z0: ``(B, *state)``.

    alpha: any ``a > 0``. The resolvent is a dense inverse (computed once per call) when the
    operator has a ``matrix``, otherwise CGNR warm-started from the previous step, to relative
    residual ``max(cg_tol, 0.01 * current PR residual)`` (``cg_tol`` default ``tol / 10``,
    floored at ``10 eps``) with at most ``cg_max_iter`` iterations per PR step.
    Returns ``(z, SolverStats)``.
    """
    _require_problem(problem, "peaceman_rachford")
    check_common(tol, max_iter)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    a = float(alpha)
    mf, tr = _MonotoneForm(problem), Tracker(tol, "peaceman_rachford")
    L0 = mf.matrix()
    if L0 is not None:
        V = dense_resolvent(L0, a)
    else:
        eps = torch.finfo(z0.dtype).eps
        ct = max(0.1 * tol, 10 * eps) if cg_tol is None else float(cg_tol)
        V = iterative_resolvent(mf.lin, mf.lin_t, a, tol=ct, max_iter=cg_max_iter)
    y = mf.to_y(z0)
    pre = mf.lin(y) + mf.bias
    tr.observe(z0, mf.residual(y, pre))
    v = y + a * (pre - y)
    y_half = y
    while not tr.done() and tr.iterations < max_iter:
        u_half = 2 * y - v
        # Inexact resolvents: early PR steps need less CG accuracy; the errors are summable
        # because the loosening follows the (geometrically decaying) PR residual.
        y_half = V(u_half + a * mf.bias, y_half, 0.01 * float(tr.best_res.max()))
        v_new = 2 * y_half - u_half
        act = batch_mask(tr.active, y)
        v = torch.where(act, v_new, v)
        y = torch.where(act, problem.prox(v_new), y)
        tr.iterations += 1
        pre = mf.lin(y) + mf.bias
        tr.observe(mf.to_z(y), mf.residual(y, pre))
    return tr.result()


forward_backward.requires_problem = True
peaceman_rachford.requires_problem = True
