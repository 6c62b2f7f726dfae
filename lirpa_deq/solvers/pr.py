"""Peaceman-Rachford splitting for ``z = prox(L z + b)`` (monotone ``I - L0``, see :mod:`.splitting`).

With ``J = ((1 + a) I - a L0)^-1`` (the resolvent of the affine part) the iteration on the
auxiliary ``v`` is ``T(v) = 2 y_h - u`` with ``y = prox(v)``, ``u = 2 y - v``,
``y_h = J(u + a S b)``; the state is ``y = prox(v)``. ``T = R_A R_B`` is a contraction with the
proven factor ``delta(a) < 1`` of :func:`.steps.pr_rate` whenever the margin ``m > 0`` (and
nonexpansive for every ``a > 0`` on a merely monotone problem), so
``||y_k - y*|| <= delta^k ||v_0 - v*||``.

Safeguarded Anderson acceleration (``anderson_m > 0``, the default): the Anderson candidate
``c`` (mixing of the last ``anderson_m`` pairs ``(v, T v)``) is accepted, per sample, only if its
``T``-residual satisfies ``||T c - c|| <= delta ||T v_k - v_k||``; otherwise the plain step
``v_{k+1} = T v_k`` is taken, which meets the same inequality because ``T`` is a
``delta``-contraction. Hence ``||T v_k - v_k|| <= delta^k ||T v_0 - v_0||`` and
``||v_k - v*|| <= delta^k ||T v_0 - v_0|| / (1 - delta)``: the plain method's guarantee, at
most two resolvents per iteration (one when the candidate is accepted). Without a margin
(``delta = 1``) the test only forbids residual increases. All of this is for exact
resolvents: dense ones are exact up to rounding; iterative ones are solved to a tolerance that
follows the current residual (:class:`_PRMap`), i.e. to summable errors.
"""
from __future__ import annotations

import torch

from ._common import check_common
from .anderson import _History, _mixing_weights
from .linear import dense_resolvent, iterative_resolvent
from .splitting import _MonotoneForm, _pr_alpha_of, _require_problem
from .stats import Tracker, batch_mask
from .steps import pr_rate


class _PRMap:
    """``T(v)`` and its resolvent, with CG warm starts and per-sample CG tolerances."""

    def __init__(self, problem, mf, a, tol, dtype, cg_tol, cg_max_iter):
        self.p, self.mf, self.a = problem, mf, a
        L0 = mf.matrix()
        if L0 is not None:
            self.J, self.amp = dense_resolvent(L0, a), None
        else:
            # A resolvent error is amplified by up to 1 + ||L0|| in the fixed-point residual.
            self.amp = 1.0 + mf.bounds()[3]
            eps = torch.finfo(dtype).eps
            ct = max(0.1 * tol / self.amp, 4 * eps) if cg_tol is None else float(cg_tol)
            self.J = iterative_resolvent(mf.lin, mf.lin_t, a, tol=ct, max_iter=cg_max_iter)
        self.y_half = None

    def __call__(self, v, res, idx=None):
        """``T(v)`` for the samples ``idx`` (all if None); ``res``: their current residuals."""
        bias = self.mf.bias if idx is None else self.mf.bias[idx]
        y = self.p.prox(v) if self.p.mask is None or idx is None else self.p.mask[idx] * v
        u = 2 * y - v
        x0 = self.y_half if idx is None or self.y_half is None else self.y_half[idx]
        call_tol = None if self.amp is None else (0.1 / self.amp * res).nan_to_num(0.01).clamp(max=0.01)
        yh = self.J(u + self.a * bias, x0, call_tol)
        if idx is None:
            self.y_half = yh
        elif self.y_half is not None:
            self.y_half = self.y_half.index_copy(0, idx, yh)
        return 2 * yh - u


def _vnorm(x):
    return x.flatten(1).norm(dim=1)


def peaceman_rachford(problem, z0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 50,
                      alpha: float | None = None, anderson_m: int = 5, anderson_lam: float = 1e-4,
                      cg_tol: float | None = None, cg_max_iter: int = 100):
    """Peaceman-Rachford splitting. problem: :class:`ReLUAffineProblem`; z0: ``(B, *state)``.

    alpha: any ``a > 0`` converges on a monotone problem; None (default) picks the step that
    minimises the proven contraction factor (:func:`lirpa_deq.solvers.default_pr_alpha`).
    anderson_m: memory of the safeguarded Anderson acceleration (module docstring; 0 = plain
    PR); anderson_lam: its relative regularisation.
    The resolvent is a dense inverse (once per call) when the operator has a ``matrix``,
    otherwise BiCGSTAB (CGNR finishes samples it leaves unsolved, see :mod:`.linear`)
    warm-started from the previous resolvent output, stopped per sample at
    relative residual ``clamp(0.1 r / (1 + B0), cg_tol, 0.01)`` (``r``: the sample's current
    fixed-point residual, ``B0 >= ||L0||``); ``cg_tol`` defaults to ``tol / (10 (1 + B0))``,
    floored at ``4 eps``; at most ``cg_max_iter`` iterations per resolvent (each method).
    Returns ``(z, SolverStats)``; ``v`` starts at ``y0 + a (L0 y0 + S b - y0)``, so a warm
    start at the fixed point is stationary.
    """
    _require_problem(problem, "peaceman_rachford")
    check_common(tol, max_iter)
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not (isinstance(anderson_m, int) and not isinstance(anderson_m, bool) and anderson_m >= 0):
        raise ValueError(f"anderson_m must be an integer >= 0, got {anderson_m!r}")
    if not anderson_lam >= 0:
        raise ValueError(f"anderson_lam must be >= 0, got {anderson_lam!r}")
    mf, tr = _MonotoneForm(problem), Tracker(tol, "peaceman_rachford")
    a = _pr_alpha_of(mf) if alpha is None else float(alpha)
    T = _PRMap(problem, mf, a, tol, z0.dtype, cg_tol, cg_max_iter)
    y = mf.to_y(z0)
    pre = mf.lin(y) + mf.bias
    res = mf.residual(y, pre)
    tr.observe(z0, res)
    v = y + a * (pre - y)
    B = v.shape[0]
    if anderson_m:
        b = mf.monotone_bounds()
        delta = 1.0 if b is None else pr_rate(a, b)
        hist = _History(anderson_m, differentiable=torch.is_grad_enabled())
    Tv = gv = None
    while not tr.done() and tr.iterations < max_iter:
        if Tv is None:
            Tv = T(v, res)
            gv = _vnorm(Tv - v)
        if not anderson_m:
            v_new, Tv = Tv, None
        else:
            hist.push(v.reshape(B, -1), Tv.reshape(B, -1))
            _, Fs, G, latest = hist.view()
            mix = _mixing_weights(G, anderson_lam, latest).unsqueeze(1)
            c = torch.bmm(mix, Fs).squeeze(1).view_as(v)
            Tc = T(c, res)
            gc = _vnorm(Tc - c)
            ok = (gc <= delta * gv) | ~tr.active
            if not bool(ok.all()):  # safeguard: plain step for the rejected samples
                idx = (~ok).nonzero().flatten()
                p = Tv[idx]
                Tp = T(p, res[idx], idx)
                c, Tc = c.index_copy(0, idx, p), Tc.index_copy(0, idx, Tp)
                gc = gc.index_copy(0, idx, _vnorm(Tp - p))
            v_new, Tv, gv = c, Tc, gc
        act = batch_mask(tr.active, v)
        v = torch.where(act, v_new, v)
        tr.iterations += 1
        y = problem.prox(v)
        pre = mf.lin(y) + mf.bias
        res = mf.residual(y, pre)
        tr.observe(mf.to_z(y), res)
    return tr.result()


peaceman_rachford.requires_problem = True
