"""monDEQ operator-splitting solvers (Winston & Kolter 2020) for ``z = prox(L z + b)``.

Both need the cell structure, i.e. a :class:`ReLUAffineProblem`, and a monotone operator:
``I - L0 >= m I`` with ``L = S^-1 L0 S`` (``S`` positive diagonal, identity for most cells).
Since ``prox`` (relu, or a 0/1 mask) commutes with positive diagonal scaling, the solvers
iterate on ``y = S z``, where ``y = prox(L0 y + S b)`` is monotone, and report residuals and
results in ``z``. Residuals are those of the DEQ map ``problem(z)`` (same as every solver).

This module: the ``y``-coordinate form with its proven operator bounds, the default step
sizes (:mod:`.steps` derives them), and forward-backward
``y <- prox((1 - a) y + a (L0 y + S b))``, which converges for ``0 < a < 2 m / ||I - L0||^2``
(and any step with a proven factor ``< 1``). Peaceman-Rachford is in :mod:`.pr`.
"""
from __future__ import annotations

import math

import torch

from ._common import check_common
from .problem import ReLUAffineProblem
from .stats import Tracker, batch_mask, per_sample_residual
from .steps import MonotoneBounds, fb_alpha, pr_alpha


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
        """A proven upper bound on ``||L0||_2`` (for matrix-free operators)."""
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
    def bounds(self, full: bool = False):
        """``(sym_max, skew, lip, l0)``: proven upper bounds on ``lambda_max(sym(I - L0))``,
        ``||skew(I - L0)||``, ``||I - L0||`` and ``||L0||`` (all ``_2``; see :mod:`.steps`).

        Dense operators: float64 eigenvalues of ``sym(M)`` and ``skew(M)^T skew(M)``
        (``M = I - L0``; exact up to rounding, covered by a relative slack of 1e-9), then
        ``lip = sym_max + skew`` and ``l0 = 1 + lip``, or with ``full`` the exact float64 norms
        (two more eigenvalue problems). Matrix-free: the operator's ``norm_bound`` /
        ``i_minus_w_norm_bound`` / ``monotone_parts_bound`` where present (the transpose has
        the same values), else bounds implied by ``||L0||``. Cached per instance.
        """
        cache = self.__dict__.setdefault("_bounds", {})
        if full in cache:
            return cache[full]
        L = self.matrix()
        if L is not None:
            L = L.detach().double()
            M = torch.eye(L.shape[0], dtype=L.dtype, device=L.device) - L
            S, K = (M + M.T) / 2, (M - M.T) / 2

            def top(X):
                return max(float(torch.linalg.eigvalsh(X)[-1]), 0.0) * (1 + 1e-9)

            sym_max, skew = top(S), math.sqrt(top(K.T @ K))
            if full:
                lip, l0 = math.sqrt(top(M.T @ M)), math.sqrt(top(L.T @ L))
            else:
                lip = sym_max + skew
                l0 = 1.0 + lip
        else:
            l0 = self.l0_norm_bound()
            lip, sym_max, skew = 1.0 + l0, 1.0 + l0, l0
            op, shape = self.p.op, self.p.state_shape
            if self.s is None:
                fn = getattr(op, "i_minus_w_norm_bound", None)
                if fn is not None:
                    lip = min(lip, float(fn(shape)))
                fn = getattr(op, "monotone_parts_bound", None)
                if fn is not None:
                    sb, kb = fn(shape)
                    sym_max, skew = min(sym_max, float(sb)), min(skew, float(kb))
            skew = min(skew, lip)
        cache[full] = (sym_max, skew, lip, l0)
        return cache[full]

    def monotone_bounds(self, full: bool = False) -> MonotoneBounds | None:
        """:class:`MonotoneBounds` with the problem's margin, None without a margin > 0."""
        m = self.p.margin
        if m is None or not m > 0:
            return None
        return MonotoneBounds(float(m), *self.bounds(full))


def default_fb_alpha(problem: ReLUAffineProblem) -> float:
    """A forward-backward step with a proven contraction factor (:func:`.steps.fb_alpha`).

    Needs ``problem.margin > 0``. The step is in ``(0, 2 m / B^2]`` (``B >= ||I - L0||``), or
    ``1`` where a proven ``||L0||`` is smaller than the certified factor (contractive cells).
    """
    b = _MonotoneForm(problem).monotone_bounds(full=True)
    if b is None:
        raise ValueError("forward_backward needs either alpha=... or a problem with a "
                         f"monotonicity margin > 0 (got margin={problem.margin!r})")
    return fb_alpha(b)


def default_pr_alpha(problem: ReLUAffineProblem) -> float:
    """The Peaceman-Rachford step minimising the proven contraction bound
    (:func:`.steps.pr_alpha`); ``1 / B`` (``B >= ||I - L0||``) without a margin."""
    return _pr_alpha_of(_MonotoneForm(problem))


def _pr_alpha_of(mf: _MonotoneForm) -> float:
    b = mf.monotone_bounds()
    return 1.0 / max(mf.bounds()[2], 1e-12) if b is None else pr_alpha(b)


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


forward_backward.requires_problem = True
