"""CROWN-tight relaxations inside a DEQ: the DEQ's counterpart of CROWN's intermediate bounds.

The adjoint theorem (lirpa_deq.bounds.adjoint) bounds any linear function q = G z* + G_u u of the
fixed point and the injection over the whole input region, given a relaxation of the cell that is
valid on a PROVED box of z* (and, for ReLU-affine cells, on proved pre-activation bounds of
s = W z* + u). The refinement loop turns this into tighter relaxations:

1. start from the proved box B (the interval post-fixpoint or a fallback ball) and the
   pre-activation bounds it implies by interval arithmetic;
2. bound the family's *refinement rows* with the current relaxation (ReLU-affine: s_i for every
   unstable neuron i, i.e. G = W^T e_i, G_u = e_i; generic: z*_i, G = e_i), each row a
   specification of one adjoint solve, concretized over the input box and widened by its rounding
   error (:func:`lirpa_deq.bounds.adjoint.concrete_bounds`);
3. INTERSECT the result with the current bounds (never replace: both are proved, so the
   intersection is), tighten the box of z* from them (ReLU-affine: z* = relu(s), so
   z* ∈ [relu(l), relu(h)]), re-relax on the new bounds, and repeat while the bounds shrink by more
   than ``refine_tol`` (relative), at most ``crown_refine`` rounds.

Every state of the loop is proved for every input of the region, so the relaxation built on it
satisfies the theorem's requirements; stopping early (rounds, tolerance, a cap on the number of rows
``refine_max_rows``) only leaves bounds looser. The state is computed once per input box and
parameter state and reused by every specification of a ``compute_bounds`` (``CellBounds.refined``).
"""
from __future__ import annotations

import dataclasses

import torch

from ..rounding import dot_error
from .adjoint import DEFAULT_MAX_ITER, DEFAULT_TOL, _dot, best_adjoint_bound, bound_at, exact_adjoint

DEFAULT_ROUNDS = 0  # opt-in: bound_opts["deq"]["crown_refine"] = 2 is the recommended setting
DEFAULT_REFINE_TOL = 0.01
DEFAULT_MAX_ROWS = 2048
SPEC_ELEMENTS = 1 << 22  # memory cap: rows x batch x state entries per adjoint solve
ROW_LR = 0.1  # Adam step of the per-row slope optimization (refine_opt_steps)


@dataclasses.dataclass
class RelaxationState:
    """What a family's relaxation is built on. ``box``: (lo, hi) of z*, each (B, *state), inside the
    proved box; ``pre``: family-specific further bounds (ReLU-affine: (l, h) of s = W z* + u) or
    None; ``info``: rounds run, rows bounded, relative shrink per round."""

    box: tuple
    pre: tuple | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def with_box(self, box):
        return RelaxationState(box, self.pre, self.info)


def _flat(pair, batch):
    return tuple(t.detach().reshape(batch, -1) for t in pair)


@torch.no_grad()
def refine(family, box, u_box, params, options, concretize=None) -> RelaxationState:
    """The refined RelaxationState of ``family`` (a CellBounds) over the proved ``box`` for u in
    ``u_box``; ``options``: the node's adjoint options (``crown_refine``, ``refine_tol``,
    ``refine_max_rows``, ``adjoint_max_iter``, ``adjoint_tol``); ``concretize``: a callable
    concretizing a linear function of u (K, B, M) over the input region (see concrete_bounds)."""
    rounds = int(options.get("crown_refine", DEFAULT_ROUNDS))
    rel_tol = float(options.get("refine_tol", DEFAULT_REFINE_TOL))
    max_rows = int(options.get("refine_max_rows", DEFAULT_MAX_ROWS))
    max_iter = int(options.get("adjoint_max_iter", DEFAULT_MAX_ITER))
    tol = float(options.get("adjoint_tol", DEFAULT_TOL))
    opt_steps = int(options.get("refine_opt_steps", 0))
    state = family.initial_state(box, u_box, params)
    batch = box[0].shape[0]
    shrinks, rows_done = [], 0
    for _ in range(rounds):
        rows = family.refinement_rows(state, params, max_rows)
        if rows is None:
            break
        G, G_u, index = rows
        relaxation = family.linear_relaxation(state, u_box, params, grad=False)
        lower, upper = concrete_bounds(G, G_u, relaxation, _flat(state.box, batch), _flat(u_box, batch),
                                       max_iter=max_iter, tol=tol, concretize=concretize, opt_steps=opt_steps)
        if not bool(torch.isfinite(lower).all() and torch.isfinite(upper).all()):
            break  # overflow: keep the last proved state
        state, shrink = family.tighten(state, index, lower, upper, u_box, params)
        rows_done += G.shape[0]
        shrinks.append(round(shrink, 4))
        if shrink < rel_tol:
            break
    state.info = dict(rounds=len(shrinks), rows=rows_done, shrink=shrinks)
    return state


def intersect(old, lower, upper):
    """(max(old_lo, lower), min(old_hi, upper)), keeping the old bounds wherever the new ones
    would cross them (only rounding can make two proved bounds cross)."""
    lo, hi = torch.maximum(old[0], lower), torch.minimum(old[1], upper)
    crossed = lo > hi
    return torch.where(crossed, old[0], lo), torch.where(crossed, old[1], hi)


def scatter_rows(template, index, values):
    """A (B, N) tensor equal to ``template`` except at the columns ``index`` (K,), which take
    ``values`` (K, B)."""
    out = template.clone()
    out[:, index] = values.transpose(0, 1).to(out.dtype)
    return out


def relative_shrink(old, new):
    """How much the total width shrank (0 = not at all, 1 = to points)."""
    before = float((old[1] - old[0]).sum())
    return 0.0 if before <= 0 else max(0.0, 1 - float((new[1] - new[0]).sum()) / before)


# ---------------------------------------------------------------- concrete bounds of many rows
def _row_values(rows, off, relaxation, box, in_box, concretize, max_iter, tol, grad):
    """Sound lower bounds (R,) x B of the rows ``rows`` (R, B, N) (+ ``off`` on u), widened by their
    rounding error; with ``grad``, differentiable in the relaxation's slopes (exact gradient)."""
    N, M = rows.shape[2], in_box[0].shape[1]
    u_c, u_r = (in_box[1] + in_box[0]) / 2, (in_box[1] - in_box[0]) / 2
    record = {}
    A, bias, _, nu = best_adjoint_bound(rows, relaxation, box, in_box, max_iter, tol, offset=off, record=record)
    if grad:
        with torch.enable_grad():
            A, bias = bound_at(exact_adjoint(nu, rows, relaxation, record, max_iter, tol), rows, relaxation, box)
    with torch.set_grad_enabled(grad):
        if off is not None:
            A = A + off
        value = bias + _dot(A, u_c) - _dot(A.abs(), u_r)
        through = concretize(A) if concretize is not None else None
        if through is not None:
            value = torch.maximum(value, bias + through.to(value.dtype))
        # rounding: every product summed above is at most |A| |u| or |nu| |z| (+ the M(nu) products)
        u_mag = torch.maximum(in_box[0].abs(), in_box[1].abs())
        z_mag = torch.maximum(box[0].abs(), box[1].abs())
        mag = _dot(A.detach().abs(), u_mag) + 2 * _dot(nu.abs() + rows.abs(), z_mag) + bias.detach().abs()
        return value - dot_error(2 * (N + M), mag)


@torch.no_grad()
def concrete_bounds(G, G_u, relaxation, box, in_box, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL,
                    max_elements=SPEC_ELEMENTS, concretize=None, opt_steps=0):
    """Proved lower and upper bounds of q = G z* + G_u u over every u of in_box, per row.

    G: (K, B, N) rows on z*; G_u: (K, B, M) rows on u (or None); box, in_box: (lo, hi) flattened
    (B, N) / (B, M). The adjoint theorem is applied to +G and -G (chunks of rows, at most
    ``max_elements`` entries of K x B x N at a time), its linear function of u concretized over
    in_box, and the result moved outward by the rounding error of that arithmetic
    (lirpa_deq.rounding), so that a refined box built from it is still proved in floating point.
    ``concretize(A (K, B, M)) -> (K, B) or None``: a tighter lower bound of <A, u> over the input
    region (lirpa_deq.bounds.prefix); the larger of the two sound values is kept.
    ``opt_steps`` > 0: each row's own lower slopes are then optimized for that row's bound (Adam on
    the exact gradient, slopes clamped to [0, 1]); every step's bound is sound and the best per row
    is kept (relaxations without slopes skip this).
    Returns (lower, upper), each (K, B)."""
    K, B, N = G.shape
    step = max(1, max_elements // max(1, 2 * B * max(N, in_box[0].shape[1])))
    lowers, uppers = [], []
    for start in range(0, K, step):
        g = G[start:start + step]
        k = g.shape[0]
        rows = torch.cat([g, -g])
        off = None if G_u is None else torch.cat([G_u[start:start + step], -G_u[start:start + step]])
        value = _row_values(rows, off, relaxation, box, in_box, concretize, max_iter, tol, grad=False)
        if opt_steps > 0 and getattr(relaxation, "aL", None) is not None:
            value = torch.maximum(value, _optimized_rows(rows, off, relaxation, box, in_box, concretize,
                                                         max_iter, tol, opt_steps))
        lowers.append(value[:k])
        uppers.append(-value[k:])
    return torch.cat(lowers), torch.cat(uppers)


def _optimized_rows(rows, off, relaxation, box, in_box, concretize, max_iter, tol, steps):
    """The best over ``steps`` Adam steps of per-row lower slopes of each row's sound bound."""
    slopes = relaxation.aL.unsqueeze(0).expand(rows.shape).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([slopes], lr=ROW_LR)
    best = None
    for _ in range(steps):
        with torch.enable_grad():  # (the caller runs without gradients)
            value = _row_values(rows, off, relaxation.with_lower_slopes(slopes), box, in_box, concretize,
                                max_iter, tol, grad=True)
            best = value.detach() if best is None else torch.maximum(best, value.detach())
            optimizer.zero_grad()
            (-value.sum()).backward()
        optimizer.step()
        slopes.data.clamp_(0, 1)
    return best
