"""A PROVED box containing z*(x) = cell(z*(x), x) for every x in [x_lo, x_hi], for a generic cell.

Let F(Z) be the nested auto_LiRPA interval of cell(z, x) over z in Z, x in the x box, widened by a
floating-point margin. Two sound constructions, both relying on the cell's proved contraction
(L < 1 in z, l2), which makes the fixed point unique:

1. **Post-fixpoint** (as for ReLU-affine cells): if F(B) ⊆ B, the continuous map z -> cell(z, x)
   sends the compact convex B into itself, so (Brouwer) it has a fixed point in B, which by
   uniqueness is z*(x); and z*(x) = cell(z*(x), x) ∈ F(B). B is found by a heuristic search from
   the point solution (Anderson on the interval map) and then a widening iteration
   B <- hull(B, F(B)) + pad, checked after every step.
2. **Contraction ball** (fallback, always available; the lemma of lirpa_deq.bounds.ball_box): with z0
   any point and
   rho = max_{x} ||cell(z0, x) - z0||_2 (bounded coordinatewise by the interval F({z0})),
   ||z*(x) - z0|| <= L ||z*(x) - z0|| + rho, so z*(x) lies in the l2 ball of radius rho / (1 - L)
   around z0, hence in its bounding box.

Either way, z* ∈ F(B) ∩ B for any proved B, so further intersected interval steps tighten the box
soundly.
"""
from __future__ import annotations

import torch

from ..ball_box import ball_to_box
from ..interval import IntervalOptions, IntervalProofError, search_box_fixed_point


def _interval_map(bounder, x_box):
    """F with a rounding margin: (lo, hi) -> sound widened interval of the cell."""
    def F(lo, hi):
        a, b = bounder.ibp((lo, hi), x_box)
        slack = bounder.rounding_slack(lo, hi, a, b)
        return a - slack, b + slack
    return F


def _inside(a, b, lo, hi):
    return bool((a >= lo).all() and (b <= hi).all())


def _post_fixpoint(F, z_mid, opts, contain=None):
    """F(B) for a box B with F(B) ⊆ B near the interval fixed point searched from z_mid; with
    ``contain`` (a point (B, *state), the solver's start for the Picard containment), B itself,
    which contains that point."""
    lo, hi, stats = search_box_fixed_point(F, z_mid, z_mid, opts)
    if contain is not None:
        lo, hi = torch.minimum(lo, contain), torch.maximum(hi, contain)
    view = (-1,) + (1,) * (z_mid.dim() - 1)
    scale = 1.0
    for attempt in range(opts.retries + 1):
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            break
        a, b = F(lo, hi)
        resid = torch.maximum((a - lo).abs(), (b - hi).abs())
        size = torch.maximum(lo.abs(), hi.abs())
        t = scale * (2 * resid + opts.inflate_abs * (1 + size)).flatten(1).max(1).values
        pad = t.view(view) + scale * opts.inflate_rel * (hi - lo)
        B_lo, B_hi = lo - pad, hi + pad
        for _ in range(max(opts.retry_iters, 1)):  # widening: hull(B, F(B)) until F(B) ⊆ B
            a, b = F(B_lo, B_hi)
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                break
            if _inside(a, b, B_lo, B_hi):
                info = dict(search_iterations=stats.iterations, search_residual=stats.residual,
                            attempts=attempt + 1, box="interval-post-fixpoint")
                return (B_lo, B_hi, info) if contain is not None else (a, b, info)
            B_lo, B_hi = torch.minimum(B_lo, a - pad), torch.maximum(B_hi, b + pad)
        scale *= 10
    raise IntervalProofError(f"no post-fixpoint of the generic cell's interval map found (search residual "
                             f"{stats.residual:.2e} after {stats.iterations} iterations)")


def contraction_ball_box(F, z0, lipschitz):
    """The fallback box z0 ± rho / (1 - L) (see module doc; lirpa_deq.bounds.ball_box); z0 (B, *state)."""
    a, b = F(z0, z0)
    dev = torch.maximum((a - z0).abs(), (b - z0).abs())
    rho = dev.flatten(1).norm(dim=1)
    return ball_to_box(z0, (rho / (1 - lipschitz)) * (1 + 1e-6))


@torch.no_grad()
def prove_generic_box(bounder, z_mid, x_lo, x_hi, lipschitz, opts: IntervalOptions | None = None):
    """A PROVED box (lo, hi, info) containing z*(x) for every x in [x_lo, x_hi] (see module doc).

    bounder: the cell's CellBounder; z_mid: (B, *state) starting point (e.g. the point solution);
    lipschitz: the cell's proved z-contraction constant (< 1)."""
    opts = opts or IntervalOptions()
    F = _interval_map(bounder, (x_lo, x_hi))
    ball = contraction_ball_box(F, z_mid, lipschitz)  # always sound; one F call
    try:
        lo, hi, info = _post_fixpoint(F, z_mid, opts)
        # both boxes contain z*: the ball can be far tighter when the proof needed a large inflation
        lo, hi = torch.maximum(lo, ball[0]), torch.minimum(hi, ball[1])
    except IntervalProofError as err:
        if not opts.fallback:
            raise
        lo, hi = ball
        info = {"box": "contraction-ball", "interval_error": str(err)}
    lo, hi = _tighten(F, lo, hi, opts)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo <= hi).all()):
        raise IntervalProofError("the generic cell's box is not finite (NaN or inf in the cell's interval map); "
                                 "no bound is returned")
    return lo, hi, info


def _tighten(F, lo, hi, opts):
    """Intersected interval steps B <- F(B) ∩ B: each keeps every fixed point of the cell that lies in
    B (z = cell(z, x) ∈ F(B)). The proved box is an inflated one (a pad around the interval fixed
    point); these steps shrink it back while they make progress."""
    for step in range(max(opts.tighten_steps, opts.retry_iters)):
        a, b = F(lo, hi)
        new_lo, new_hi = torch.maximum(lo, a), torch.minimum(hi, b)
        gain = float(((new_hi - new_lo) - (hi - lo)).abs().max())
        lo, hi = new_lo, new_hi
        if step + 1 >= opts.tighten_steps and gain <= 1e-3 * float((hi - lo).max()):
            break
    return lo, hi


@torch.no_grad()
def prove_picard_box(bounder, z_mid, z_start, x_lo, x_hi, opts: IntervalOptions | None = None):
    """A box of the PICARD LIMIT of a cell that need not be a contraction (lo, hi, info).

    Lemma (invariant box). If B is a box with z_start ∈ B and F(B) ⊆ B, then for every x of the x box
    every iterate of z_{k+1} = (1 - d) z_k + d cell(z_k, x), z_0 = z_start, 0 < d <= 1, lies in B
    (induction: cell(z_k, x) ∈ F(B) ⊆ B and B is convex), hence so does their limit when it exists
    (B is closed); that limit is a fixed point, so it also lies in every intersected refinement
    F(B) ∩ B (``_tighten``). No uniqueness is needed, but the guarantee is about THIS solve: another
    solver (Anderson, Broyden) or another start may reach a different fixed point outside B.

    Returns the refined box and info with ``box='picard-invariant'`` and ``invariant_box`` (the box
    B itself, which contains every iterate, converged or not). Raises IntervalProofError when no
    invariant box is found (the interval map expands: e.g. a ReLU-affine cell with rho(|W|) >= 1)."""
    opts = opts or IntervalOptions()
    F = _interval_map(bounder, (x_lo, x_hi))
    try:
        lo, hi, info = _post_fixpoint(F, z_mid, opts, contain=z_start)
    except IntervalProofError as err:
        raise IntervalProofError(f"no invariant box of the Picard iteration found: {err}") from err
    if not bool((lo <= z_start).all() and (z_start <= hi).all()):
        raise IntervalProofError("the invariant box search lost the solver's start point")
    invariant = (lo.clone(), hi.clone())
    lo, hi = _tighten(F, lo, hi, opts)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo <= hi).all()):
        raise IntervalProofError("the Picard invariant box is not finite; no bound is returned")
    info = dict(info, box="picard-invariant", invariant_box=invariant)
    return lo, hi, info
