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

from .adjoint import DEFAULT_MAX_ITER, DEFAULT_TOL, concrete_bounds

DEFAULT_ROUNDS = 0  # opt-in: bound_opts["deq"]["crown_refine"] = 2 is the recommended setting
DEFAULT_REFINE_TOL = 0.01
DEFAULT_MAX_ROWS = 2048


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
                                       max_iter=max_iter, tol=tol, concretize=concretize)
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
