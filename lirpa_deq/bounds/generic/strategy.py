"""The generic family: any ``nn.Module`` cell ``cell(z, x)``, bounded through a nested auto_LiRPA
module (:class:`CellBounder`) and a proved contraction in z (lirpa_deq.bounds.generic.contraction).

* box: the post-fixpoint of the nested interval map, intersected with the contraction ball (the
  ball alone is the fallback; lirpa_deq.bounds.generic.box);
* interval step: one nested IBP step intersected with the proved box, differentiable in the x
  bounds and the cell parameters (certified training);
* relaxation: CROWN's linear bounds of the cell over the box (``return_A``), as matrices; the box
  is first tightened by CROWN bounds of every coordinate of z* (lirpa_deq.bounds.refine, rows
  G = e_i) and the nested relaxation rebuilt over it.

The nested module is kept while it still computes what the live cell computes (:meth:`_refresh`).
"""
from __future__ import annotations

import torch

from ..adjoint import MatrixRelaxation
from ..cell_bounds import CellBounds, register_cell_bounds
from ..refine import RelaxationState, intersect, relative_shrink, scatter_rows
from .box import prove_generic_box
from .cell_bounder import CellBounder
from .contraction import contraction_certificate


class GenericBounds(CellBounds):
    """CellBounds of generic cells (every DEQ layer whose cell is not ReLU-affine)."""

    @classmethod
    def handles(cls, deq):
        return bool(deq.generic)

    def __init__(self, deq, interval_options, adjoint_options):
        super().__init__(deq, interval_options, adjoint_options)
        self.bounder = None  # the nested auto_LiRPA module of the cell

    def _bounder_for(self, z, x):
        """The CellBounder for these shapes (:meth:`_refresh` ran first in this bound computation, so
        only the shapes are checked here)."""
        if self.bounder is None or self.bounder.cell is not self.deq.cell or not self.bounder.fits(z, x):
            self.bounder = CellBounder(self.deq.cell, z.detach(), x.detach())
        return self.bounder

    def _refresh(self, x_lo, x_hi):
        """Make sure the nested module still computes what the live cell computes; True when it had to
        be rebuilt. Tracing freezes Python and tensor attributes (``cell.skip = 0.3``) as constants:
        the bounder's fingerprint of them must match. The traced and live cells are also compared at a
        few states (the forward value, random states of two scales) and x at the corners and middle of
        its box, which catches some -- not all -- data-dependent control flow (auto_LiRPA's tracing has
        the same limit)."""
        deq = self.deq
        shape = deq.state_shape(x_lo.shape)
        gen = torch.Generator(device=x_lo.device).manual_seed(0)
        states = [torch.randn(shape, generator=gen, dtype=x_lo.dtype, device=x_lo.device) * s for s in (1.0, 10.0)]
        fv = self.forward_value
        if isinstance(fv, torch.Tensor) and tuple(fv.shape) == tuple(shape) and fv.dtype == x_lo.dtype:
            states.append(fv.detach())
        inputs = [((x_lo + x_hi) / 2).detach(), x_lo.detach(), x_hi.detach()]
        points = [(z, x) for z in states for x in inputs]
        bounder = self.bounder
        # an existing bounder (fingerprint unchanged) is re-checked on a diagonal of the points; a new
        # one on all of them
        diagonal = [(states[k % len(states)], inputs[k]) for k in range(len(inputs))]
        if bounder is not None and bounder.cell is deq.cell and bounder.matches(points[0][0], points[0][1]) \
                and all(bounder.reproduces(z, x) for z, x in diagonal):
            return False
        bounder = CellBounder(deq.cell, *points[0])
        _check_per_sample(deq.cell, *points[0])
        if not all(bounder.reproduces(z, x) for z, x in points):
            # a fresh trace that disagrees with the cell at once: beyond rounding, the forward is not one
            # fixed computation (data-dependent control flow, randomness)
            loose = torch.finfo(x_lo.dtype).eps ** 0.5
            if not all(bounder.reproduces(z, x, tol=loose) for z, x in points):
                raise RuntimeError(f"auto_LiRPA's trace of {type(deq.cell).__name__} does not reproduce the cell's "
                                   "output (data-dependent control flow or randomness in forward?); the generic "
                                   "bounds need a cell whose forward is the same computation for every input")
        self.bounder = bounder
        return True

    def _key_extras(self):
        declared = getattr(self.deq.cell, "lipschitz_z", None)
        declared = declared() if callable(declared) else declared  # (a callable's value: not in the fingerprint)
        return [torch.tensor(-1.0 if declared is None else float(declared))]

    def _prove(self, x_lo, x_hi, params, z_mid):
        bounder = self._bounder_for(z_mid, x_lo)
        x_mid = (x_lo + x_hi) / 2
        if not bool(torch.isfinite(z_mid).all()):  # a diverged warm start: the search restarts from zero
            z_mid = torch.zeros_like(z_mid)
        lipschitz, source = contraction_certificate(self.deq.cell, bounder, z_mid, x_mid)
        lo, hi, info = prove_generic_box(bounder, z_mid, x_lo, x_hi, lipschitz, self.interval_options)
        info.update(lipschitz=lipschitz, lipschitz_source=source)
        return lo, hi, info

    def interval_step(self, box, x_lo, x_hi, params):
        lo, hi = box
        bounder = self._bounder_for(lo, x_lo)
        a, b = bounder.ibp((lo, hi), (x_lo, x_hi))
        slack = bounder.rounding_slack(lo, hi, a.detach(), b.detach())
        return torch.maximum(a - slack, lo), torch.minimum(b + slack, hi)

    # auto_LiRPA detaches the A matrices it returns, so the cell's relaxation is a constant: gradients
    # reach the layers after the DEQ (through g) and before it (through auto_LiRPA's use of the
    # coefficient on x), not the cell's weights -- IBP bounds of generic cells do reach them
    differentiable_relaxation = False

    def linear_relaxation(self, state, x_box, params, grad):
        lo, hi = state.box
        bounder = self._bounder_for(lo, x_box[0])
        with torch.no_grad():
            lin = bounder.linear((lo.detach(), hi.detach()), (x_box[0].detach(), x_box[1].detach()))
        return MatrixRelaxation(lin)

    def refinement_rows(self, state, params, max_rows):
        """z*_i for every coordinate (the widest ``max_rows`` first): G = e_i, no term in x."""
        lo, hi = (t.reshape(t.shape[0], -1) for t in state.box)
        batch, n = lo.shape
        width = (hi - lo).sum(0)
        index = torch.nonzero(width > 0).flatten()
        if index.numel() == 0:
            return None
        if index.numel() > max_rows:
            index = index[width[index].topk(max_rows).indices.sort().values]
        k = index.numel()
        G = torch.zeros(k, batch, n, dtype=lo.dtype, device=lo.device)
        G[torch.arange(k, device=lo.device), :, index] = 1
        return G, None, index

    def tighten(self, state, index, lower, upper, x_box, params):
        lo, hi = (t.reshape(t.shape[0], -1) for t in state.box)
        new = intersect((lo, hi), scatter_rows(lo, index, lower), scatter_rows(hi, index, upper))
        shape = state.box[0].shape
        return RelaxationState((new[0].view(shape), new[1].view(shape))), relative_shrink((lo, hi), new)


def _check_per_sample(cell, z, x):
    """The bounds (per-sample boxes and contraction balls) and the solvers (per-sample stopping) need a
    cell that maps each sample on its own: the first and the last sample's outputs must not change when
    every other sample changes (the same arithmetic runs for them, so they agree to rounding)."""
    if z.shape[0] < 2:
        return
    with torch.no_grad():
        full = cell(z, x)
        for i in (0, z.shape[0] - 1):
            others = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
            others[i] = False
            z2, x2 = z.clone(), x.clone()
            z2[others] = 2 * z2[others] + 1
            x2[others] = 2 * x2[others] + 1
            changed = cell(z2, x2)[i]
            same = bool(((changed - full[i]).abs() <= 1e-6 * (1 + full[i].abs())).all())
            if not same:
                raise ValueError(f"{type(cell).__name__} mixes the samples of a batch (sample {i} changes when computed "
                                 "alone); DEQ cells must map each sample independently (BatchNorm in eval mode, no "
                                 "reshapes across the batch dimension)")


register_cell_bounds(GenericBounds)
