"""The generic-cell branch of BoundDEQ: box, differentiable IBP step, adjoint CROWN bound.

BoundDEQ calls these when its DEQ layer holds a generic cell (``deq.generic``); node input 0 is
the DEQ input x, the others are the cell parameters (unperturbed), exactly as for ReLU-affine cells.
"""
from __future__ import annotations

import torch

from .adjoint import bound_at, generic_adjoint_lower
from .box import prove_generic_box
from .cell_bounder import CellBounder
from .contraction import contraction_certificate


def bounder_for(node, z, x):
    """The node's CellBounder for these shapes. ``BoundDEQ.interval_box`` runs
    :func:`refresh_bounder` first in every bound computation, so only the shapes are checked here."""
    bounder = getattr(node, "_generic_bounder", None)
    if bounder is None or bounder.cell is not node.deq.cell or not bounder.fits(z, x):
        bounder = CellBounder(node.deq.cell, z.detach(), x.detach())
        node._generic_bounder = bounder
    return bounder


def refresh_bounder(node, x_lo, x_hi):
    """Make sure the node's nested module still computes what the live cell computes, and return
    True when it had to be rebuilt (then every cached box is stale). Tracing freezes Python and
    tensor attributes (``cell.skip = 0.3``) as constants: the bounder's fingerprint of them must
    match. The traced and live cells are also compared at a few states (the forward value, random
    states of two scales) and x at the corners and middle of its box, which catches some -- not all
    -- data-dependent control flow (auto_LiRPA's tracing has the same limit)."""
    deq = node.deq
    shape = deq.state_shape(x_lo.shape)
    gen = torch.Generator(device=x_lo.device).manual_seed(0)
    states = [torch.randn(shape, generator=gen, dtype=x_lo.dtype, device=x_lo.device) * s for s in (1.0, 10.0)]
    fv = getattr(node, "forward_value", None)
    if isinstance(fv, torch.Tensor) and tuple(fv.shape) == tuple(shape) and fv.dtype == x_lo.dtype:
        states.append(fv.detach())
    inputs = [((x_lo + x_hi) / 2).detach(), x_lo.detach(), x_hi.detach()]
    points = [(z, x) for z in states for x in inputs]
    bounder = getattr(node, "_generic_bounder", None)
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
            raise RuntimeError(f"auto_LiRPA's trace of {type(deq.cell).__name__} does not reproduce the cell's output "
                               "(data-dependent control flow or randomness in forward?); the generic bounds need a "
                               "cell whose forward is the same computation for every input")
    node._generic_bounder = bounder
    return True


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


def generic_box(node, x_lo, x_hi, z_mid):
    """(lo, hi, info): the proved box of z* for x in [x_lo, x_hi] (no gradients)."""
    deq = node.deq
    bounder = bounder_for(node, z_mid, x_lo)
    x_mid = (x_lo + x_hi) / 2
    if not bool(torch.isfinite(z_mid).all()):  # a diverged warm start: the search restarts from zero
        z_mid = torch.zeros_like(z_mid)
    lipschitz, source = contraction_certificate(deq.cell, bounder, z_mid, x_mid)
    lo, hi, info = prove_generic_box(bounder, z_mid, x_lo, x_hi, lipschitz, node.interval_options)
    info.update(lipschitz=lipschitz, lipschitz_source=source)
    return lo, hi, info


def generic_interval_step(node, box, x_lo, x_hi):
    """z* ∈ F(B) ∩ B for the proved box B: one nested IBP step, differentiable in the x bounds and
    the cell parameters (certified training)."""
    lo, hi = box
    bounder = bounder_for(node, lo, x_lo)
    a, b = bounder.ibp((lo, hi), (x_lo, x_hi))
    slack = bounder.rounding_slack(lo, hi, a.detach(), b.detach())
    return torch.maximum(a - slack, lo), torch.minimum(b + slack, hi)


def generic_bound_backward(node, last_lA, last_uA, x_box, params, dense):
    """Coefficients on the DEQ input x and biases (see lirpa_deq.bounds.generic.adjoint).

    x_box: the checked box (x_lo, x_hi) of the DEQ input over the input region; dense: converts a
    last_A (Tensor or Patches) to a dense (spec, B, *z_shape) tensor."""
    x_lo, x_hi = x_box
    lo, hi = node.interval_box(x_lo, x_hi, params)
    bounder = bounder_for(node, lo, x_lo)
    batch, z_shape, x_shape = lo.shape[0], lo.shape[1:], x_lo.shape[1:]
    flat = lambda t: t.reshape(batch, -1)  # noqa: E731
    box, x_box = (flat(lo), flat(hi)), (flat(x_lo.detach()), flat(x_hi.detach()))
    sides = [(last_lA, 1.0), (last_uA, -1.0)]
    # auto_LiRPA detaches the A matrices it returns, so the cell's relaxation is a constant here:
    # gradients reach the layers after the DEQ (through g) and before it (through auto_LiRPA's
    # use of A_x), not the cell's weights -- IBP bounds of generic cells do reach them
    grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (last_lA, last_uA))
    with torch.no_grad():
        lin = bounder.linear((lo, hi), (x_lo, x_hi))
    opts = node.adjoint_options
    out = []
    for last_A, sign in sides:
        if last_A is None:
            out.append((None, 0))
            continue
        g = sign * dense(last_A, (batch, *z_shape)).to(lo.dtype)  # 0.3's default C is float32
        spec = g.shape[0]
        g = g.reshape(spec, batch, -1)
        A_x, bias, _, nu = generic_adjoint_lower(g.detach(), lin, box, x_box,
                                                 max_iter=int(opts.get("adjoint_max_iter", 100)),
                                                 tol=float(opts.get("adjoint_tol", 1e-6)))
        if grad:
            A_x, bias = bound_at(nu, g, lin, box)
        out.append((sign * A_x.reshape(spec, batch, *x_shape), sign * bias))
    (lA, lbias), (uA, ubias) = out
    return [(lA, uA)] + [(None, None)] * len(params), lbias, ubias
