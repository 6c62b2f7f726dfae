"""Generic cells solved by fixed-point (Picard) iteration: bounds without a global contraction.

A DEQ layer whose solver is ``fixed_point_iter`` (damping ``0 < d <= 1``) computes, from the start
``z_0 = 0``, the iterates ``z_{k+1} = (1 - d) z_k + d cell(z_k, x)``. :class:`PicardBounds` first
tries the generic family's proof (a proved contraction: the fixed point is unique, any solver finds
it). When the cell is NOT a proved contraction, it proves an *invariant box* instead
(lirpa_deq.bounds.generic.box.prove_picard_box): a box B containing z_0 with F(B) ⊆ B contains
every iterate for every admissible x, hence their limit. The bounds then hold for **the limit of
this layer's Picard solve started at zeros** (when it converges), not for other fixed points the
cell may have; ``box_info`` says which guarantee applies:

* ``guarantee='unique-fixed-point'``: proved contraction (``lipschitz`` < 1);
* ``guarantee='picard-limit'``: invariant box (``box='picard-invariant'``, ``invariant_box`` holds B,
  which contains every iterate, converged or not; ``contraction_error`` says why the contraction
  proof failed).

CROWN bounds reuse the proved box: the adjoint bound (lirpa_deq.bounds.generic.adjoint) holds for
every fixed point inside the box, so also for the Picard limit.
"""
from __future__ import annotations

import torch

from ...nn.warm_state import warm_start_state
from ..cell_bounds import register_cell_bounds
from ..interval import IntervalProofError
from .box import prove_picard_box
from .contraction import ContractionError, refusal_paths
from .strategy import GenericBounds

PICARD_SOLVER = "fixed_point_iter"


def picard_damping(deq):
    """The damping of a fixed-point-iteration layer, or None when the layer does not solve by
    (damped) Picard iteration with a damping in (0, 1]."""
    if getattr(deq, "solver", None) != PICARD_SOLVER:
        return None
    damping = float(deq.solver_opts.get("damping", 1.0))
    return damping if 0 < damping <= 1 else None


class PicardBounds(GenericBounds):
    """Generic-cell bounds that state their guarantee, with the Picard-containment fallback for
    layers solved by fixed-point iteration (see module doc)."""

    @classmethod
    def handles(cls, deq):
        return bool(deq.generic)

    def _prove(self, x_lo, x_hi, params, z_mid):
        try:
            lo, hi, info = super()._prove(x_lo, x_hi, params, z_mid)
        except ContractionError as err:
            if picard_damping(self.deq) is None:  # another solver may reach another fixed point
                raise
            return self._prove_invariant(x_lo, x_hi, z_mid, err)
        info["guarantee"] = "unique-fixed-point"
        return lo, hi, info

    def _prove_invariant(self, x_lo, x_hi, z_mid, contraction_error):
        if warm_start_state(self.deq) is not None:
            raise ContractionError(f"{contraction_error} Under serial_warm_start the Picard solve does not start at "
                                   "zeros, so its invariant box does not apply either.") from contraction_error
        bounder = self._bounder_for(z_mid, x_lo)
        if not bool(torch.isfinite(z_mid).all()):
            z_mid = torch.zeros_like(z_mid)
        start = torch.zeros_like(z_mid)  # DEQ.solve starts at zeros (the node passes no z0)
        try:
            lo, hi, info = prove_picard_box(bounder, z_mid, start, x_lo, x_hi, self.interval_options)
        except IntervalProofError as err:
            reason = (f"neither a proved contraction ({contraction_error.reason}) nor an invariant box of its "
                      f"Picard iteration ({err})")
            raise ContractionError(f"{type(self.deq.cell).__name__} has {reason}; no bound is returned. "
                                   f"{refusal_paths(self.deq.cell)}", reason=reason) from err
        info.update(guarantee="picard-limit", lipschitz=None, lipschitz_source=None,
                    contraction_error=str(contraction_error), damping=picard_damping(self.deq))
        return lo, hi, info


register_cell_bounds(PicardBounds, first=True)
