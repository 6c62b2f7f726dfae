"""Sound interval (IBP) bounds on the fixed point of a ReLU-affine DEQ, proved by a post-fixpoint.

Setting: ``z*(u) = relu(W z*(u) + u)`` with a unique fixed point for every ``u`` (the cells'
guarantee: monotone ``I - W >= mI`` or contraction ``||W||_2 < 1``), and ``u`` ranging over the
box ``[u_lo, u_hi]``. The interval step of a box ``Z = [lo, hi]`` (centre ``c``, radius ``r``)

    F(Z) = [relu(W c + u_c - (|W| r + u_r)), relu(W c + u_c + |W| r + u_r)]

contains ``T_u(z) = relu(W z + u)`` for every ``z`` in Z and ``u`` in the box (interval arithmetic;
``|W|`` may be an elementwise upper bound).

Theorem (post-fixpoint). If ``F(B) ⊆ B`` for a box B, then ``z*(u) ∈ F(B) ⊆ B`` for every ``u``
in the box. Proof: T_u is continuous and maps the compact convex set B into F(B) ⊆ B, so by
Brouwer it has a fixed point in B; the fixed point is unique, so it is z*(u); and
``z*(u) = T_u(z*(u)) ∈ F(B)``. By induction z*(u) ∈ F^k(B) for every k, so extra steps after
the proof tighten the box for free.

The iteration that FINDS the box (Anderson on the stacked [lo; hi] system, warm-started at the
point solution) is only a heuristic; soundness comes from the check alone, done with a margin
for floating-point rounding. A box that cannot be proved is never returned:
:class:`IntervalProofError` says why and what to do instead.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from ..rounding import dot_error
from ..solvers import generic_solver_names, get_solver, requires_problem


class IntervalProofError(RuntimeError):
    """No post-fixpoint box could be proved for the interval system of a DEQ layer."""


@dataclasses.dataclass
class IntervalOptions:
    """Knobs of the interval fixed point (defaults suit float32 and float64).

    solver / tol / max_iter: the search for the box (any generic registered solver).
    inflate_abs: floor of the inflation of the found box before the proof (times 1 + |z|);
    the box is inflated along (I - |W|)^-1 1 by twice its fixed-point residual plus this floor.
    inflate_rel: relative inflation used only when that direction does not exist.
    Inflations are multiplied by 10 at each retry.
    retries: proof attempts (each after ``retry_iters`` more plain interval steps).
    tighten_steps: interval steps applied after the proof (each keeps soundness).
    fallback: when no post-fixpoint is found, use the looser monotone-ball box
    (lirpa_deq.bounds.ball_box) instead of raising IntervalProofError.
    """

    solver: str = "anderson"
    tol: float = 1e-4
    max_iter: int = 50
    inflate_rel: float = 1e-3
    inflate_abs: float = 1e-6
    retries: int = 4
    retry_iters: int = 20
    tighten_steps: int = 1
    fallback: bool = True

    def __post_init__(self):
        where = "bound_opts['deq'][{!r}]"
        if not isinstance(self.solver, str):
            raise TypeError(f"{where.format('solver')} must be a solver name (str), got {self.solver!r}")
        if requires_problem(get_solver(self.solver)):  # get_solver validates the name
            raise ValueError(f"{where.format('solver')}={self.solver!r} is a splitting solver for the point "
                             "DEQ; the interval system needs a generic one: "
                             f"{', '.join(map(repr, generic_solver_names()))}")
        for name in ("tol", "inflate_rel", "inflate_abs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 <= value < math.inf):
                raise ValueError(f"{where.format(name)} must be a finite real number >= 0, got {value!r}")
        for name, least in (("max_iter", 1), ("retries", 0), ("retry_iters", 0), ("tighten_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{where.format(name)} must be an integer >= {least}, got {value!r}")
        if not isinstance(self.fallback, bool):
            raise TypeError(f"{where.format('fallback')} must be True or False, got {self.fallback!r}")


def interval_step(op, lo, hi, u_lo, u_hi):
    """One interval step F([lo, hi]) for injections in [u_lo, u_hi]; all (B, *state)."""
    c, r = (hi + lo) / 2, (hi - lo) / 2
    uc, ur = (u_hi + u_lo) / 2, (u_hi - u_lo) / 2
    sc = op.W(c) + uc
    sr = op.absW(r) + ur
    return torch.relu(sc - sr), torch.relu(sc + sr)


def preactivation_box(op, lo, hi, u_lo, u_hi):
    """Bounds on ``s = W z + u`` for z in [lo, hi], u in [u_lo, u_hi] (for ReLU relaxations)."""
    c, r = (hi + lo) / 2, (hi - lo) / 2
    sc = op.W(c) + (u_hi + u_lo) / 2
    sr = op.absW(r) + (u_hi - u_lo) / 2
    return sc - sr, sc + sr


def rounding_slack(op, lo, hi, u_lo, u_hi):
    """Elementwise bound on the floating-point error of computing F([lo, hi]) (lirpa_deq.rounding).

    sum|terms| is bounded by |W| max(|lo|, |hi|) + max(|u_lo|, |u_hi|) and the number of terms by the
    fan-in of a row of W (n for dense W, 25 * channels for 3x3-conv compositions up to 5x5 support)."""
    state = lo.shape[1:]
    fan_in = state[0] if len(state) == 1 else 25 * state[0]
    mag = op.absW(torch.maximum(lo.abs(), hi.abs())) + torch.maximum(u_lo.abs(), u_hi.abs())
    return dot_error(fan_in, mag)


def search_box_fixed_point(box_map, lo, hi, opts):
    """Heuristic search (no soundness claim) for a fixed point of an interval map
    ``box_map(lo, hi) -> (lo', hi')``: the registered solver ``opts.solver`` on the stacked
    ``[lo; hi]`` system. Returns (lo, hi, stats) with lo <= hi."""
    solver = get_solver(opts.solver)

    def F(x):
        a, b = box_map(x[:, 0], x[:, 1])
        return torch.stack([a, b], 1)

    x, stats = solver(F, torch.stack([lo, hi], 1), tol=opts.tol, max_iter=opts.max_iter)
    lo, hi = x[:, 0], x[:, 1]
    return torch.minimum(lo, hi), torch.maximum(lo, hi), stats


def _search(op, lo, hi, u_lo, u_hi, opts):
    """The search for a ReLU-affine cell's interval step."""
    return search_box_fixed_point(lambda a, b: interval_step(op, a, b, u_lo, u_hi), lo, hi, opts)


def neumann_direction(op, state_shape, like, iters=500, rtol=1e-6):
    """(v, mu): v = (I - |W|)^-1 1 by the series v <- 1 + |W| v, shape (1, *state), and its margin
    mu = v - |W| v (= 1 up to the truncation; recomputed, so nothing is assumed). Returns None when
    the series does not converge (rho(|W|) >= 1). Inflating a near-fixed box by t v gains t * mu in
    every coordinate, which is what makes the post-fixpoint provable. Scale-free: with a
    similarity W = S^-1 W0 S, v can legitimately span many orders of magnitude."""
    one = torch.ones((1, *state_shape), dtype=like.dtype, device=like.device)
    v = one
    for _ in range(iters):
        v_next = one + op.absW(v)
        if not torch.isfinite(v_next).all():
            return None
        if bool(((v_next - v).abs() <= rtol * v_next).all()):
            # mu = 1 - |W| (v_next - v): near 1 only once the absolute change is small, which for a
            # wide similarity (v ~ 1e10) takes a few more steps than the relative test
            mu = v_next - op.absW(v_next)
            if bool((mu >= 0.5).all()):
                return v_next, mu
        v = v_next
    return None


@torch.no_grad()
def prove_interval_fixed_point(op, u_lo, u_hi, z_start=None, opts: IntervalOptions | None = None):
    """A PROVED box [lo, hi] (each (B, *state)) containing z*(u) for every u in [u_lo, u_hi].

    op: the cell's WeightOperator; u_lo <= u_hi: (B, *state). z_start: warm start (e.g. the point
    solution at the box centre). Raises IntervalProofError when no post-fixpoint is found; never
    returns an unproved box. Returns (lo, hi, info) with info a dict of diagnostics.
    """
    opts = opts or IntervalOptions()
    if z_start is None:
        z_start = torch.zeros_like(u_lo)
    lo, hi, stats = _search(op, z_start, z_start, u_lo, u_hi, opts)
    direction = neumann_direction(op, tuple(u_lo.shape[1:]), u_lo)
    view = (-1,) + (1,) * (u_lo.dim() - 1)
    scale = 1.0
    for attempt in range(opts.retries + 1):
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            break
        # inflate by t * direction, t covering the current fixed-point residual of the box
        a, b = interval_step(op, lo, hi, u_lo, u_hi)
        # what the inflation must absorb: the box's fixed-point residual and the rounding slack of
        # the check (else float32 needs retries: its slack exceeds a tiny absolute floor)
        resid = torch.maximum((a - lo).abs(), (b - hi).abs()) + rounding_slack(op, lo, hi, u_lo, u_hi)
        size = torch.maximum(lo.abs(), hi.abs())
        if direction is not None:
            v, mu = direction
            # t with t * mu >= 2 * residual + floor in every coordinate (per sample)
            need = (2 * resid + opts.inflate_abs * (1 + size)) / mu
            t = scale * need.flatten(1).max(1).values
            pad = t.view(view) * v
        else:  # no Neumann direction (rho(|W|) >= 1): try a relative inflation
            t = scale * (2 * resid + opts.inflate_abs * (1 + size)).flatten(1).max(1).values
            pad = t.view(view) + scale * opts.inflate_rel * (hi - lo)
        B_lo, B_hi = (lo - pad).clamp_min(0), hi + pad  # z* >= 0 (a ReLU output)
        F_lo, F_hi = interval_step(op, B_lo, B_hi, u_lo, u_hi)
        slack = rounding_slack(op, B_lo, B_hi, u_lo, u_hi)
        # proof obligation, with the computed F widened by its worst-case rounding error
        F_lo, F_hi = (F_lo - slack).clamp_min(0), F_hi + slack
        if bool((F_lo >= B_lo).all() and (F_hi <= B_hi).all()):
            lo, hi = F_lo, F_hi  # z* ∈ F(B): already tighter than B
            for _ in range(opts.tighten_steps):
                # the slack of B bounds that of every box inside B (it grows with magnitudes)
                a, b = interval_step(op, lo, hi, u_lo, u_hi)
                lo, hi = (a - slack).clamp_min(0), b + slack
            info = dict(search_iterations=stats.iterations, search_residual=stats.residual,
                        attempts=attempt + 1, slack=slack)
            return lo, hi, info
        # not yet a post-fixpoint: take more plain steps from the inflated box, inflate more
        lo, hi = B_lo, B_hi
        for _ in range(opts.retry_iters):
            lo, hi = interval_step(op, lo, hi, u_lo, u_hi)
        scale *= 10
    raise IntervalProofError(
        "could not prove an interval fixed point (no box B with F(B) ⊆ B found after "
        f"{opts.retries + 1} attempts; search residual {stats.residual:.2e} after "
        f"{stats.iterations} iterations; (I - |W|)^-1 1 "
        f"{'exists' if direction is not None else 'does not converge, so rho(|W|) >= 1'}). "
        "Plain interval iteration diverges when rho(|W|) >= 1, which is typical of MonDEQ/Ortho "
        "cells: use an IBPMonLinear/IBPMonConv2d cell (whose "
        "interval system is itself monotone), a smaller eps, or linear bounds "
        "(method='CROWN', the adjoint-DEQ bound).")
