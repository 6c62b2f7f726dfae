"""Interval arithmetic on gradient rows (centre ``gc``, radius ``gr``), rounded outward.

A gradient row ``g`` (w.r.t. a layer's output) is enclosed by ``[gc - gr, gc + gr]``; the helpers
return an enclosure of the row w.r.t. the layer's input.

Unbounded entries. ``+inf`` in a radius (or in an absolute-value row) means "no proved bound" for
a quantity that is finite in truth (every supported model has a finite global Lipschitz bound).
So a coefficient that is EXACTLY zero (an inactive ReLU, a zero weight) times such an entry is 0,
not NaN: ``abs_apply`` and ``relu_mult`` implement that; centres stay finite (0 where the radius
is infinite).
"""
from __future__ import annotations

import math

import torch

from .layers import gamma


def rep(t, n_rows):
    """Per-sample tensor (B, ...) repeated for ``n_rows = B * K`` rows (row b * K + k)."""
    B = t.shape[0]
    return t if n_rows == B else t.repeat_interleave(n_rows // B, 0)


def abs_apply(fn, g):
    """``fn(g)`` for a linear map ``fn`` with NONNEGATIVE coefficients (``|A|^T``, ``|W|^T``) and
    ``g >= 0`` that may hold ``+inf``: an output is ``+inf`` iff it takes an infinite entry with a
    nonzero coefficient; exactly-zero coefficients contribute 0 (plain arithmetic gives NaN)."""
    inf = torch.isinf(g)
    if not bool(inf.any()):
        return fn(g)
    y = fn(torch.where(inf, torch.zeros_like(g), g))
    # sums of nonnegative coefficients: > 0 exactly when one of them is nonzero (no cancellation)
    hit = fn(inf.to(g.dtype)) > 0
    return torch.where(hit, torch.full_like(y, math.inf), y)


def affine_back(layer, gc, gr, in_shape):
    """``A^T [gc -+ gr]``: centre ``A^T gc``, radius ``|A|^T gr`` plus the rounding margin
    ``gamma (|A|^T (|gc| + gr))`` of both computed quantities. ``gc`` finite, ``gr`` may hold inf."""
    def abs_t(t):
        return abs_apply(lambda s: layer.abs_t(s, in_shape), t)

    yc = layer.lin_t(gc, in_shape)
    if gr is None:
        yr = gamma(gc.dtype, layer.fan_t) * abs_t(gc.abs())
    else:
        yr = abs_t(gr) + gamma(gc.dtype, layer.fan_t) * abs_t(gc.abs() + gr)
    return yc, yr


def relu_mult(gc, gr, active, inactive):
    """``d * g`` for every ``d`` in {1} (active), {0} (inactive) or [0, 1] (else) and every ``g``
    in the box: the exact interval hull is ``[min(0, lo), max(0, hi)]`` on unstable entries.
    Inactive entries are exactly 0 (also where ``gr`` is inf); unbounded hulls get centre 0."""
    lo, hi = gc - gr, gc + gr
    ulo, uhi = lo.clamp_max(0), hi.clamp_min(0)
    uc = (ulo + uhi) / 2
    ur = (uhi - ulo) / 2 + 2 * torch.finfo(gc.dtype).eps * torch.maximum(ulo.abs(), uhi.abs())
    unbounded = torch.isinf(ulo) | torch.isinf(uhi)
    uc = torch.where(unbounded, torch.zeros_like(uc), uc)  # (-inf + inf) / 2 would be NaN
    ur = torch.where(unbounded, torch.full_like(ur, math.inf), ur)
    zero = torch.zeros_like(gc)
    c = torch.where(active, gc, torch.where(inactive, zero, uc))
    r = torch.where(active, gr, torch.where(inactive, zero, ur))
    return c, r
