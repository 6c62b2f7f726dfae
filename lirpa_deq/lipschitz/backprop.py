"""Interval arithmetic on gradient rows (centre ``gc``, radius ``gr``), rounded outward.

A gradient row ``g`` (w.r.t. a layer's output) is enclosed by ``[gc - gr, gc + gr]``; the helpers
return an enclosure of the row w.r.t. the layer's input.
"""
from __future__ import annotations

import torch

from .layers import gamma


def rep(t, n_rows):
    """Per-sample tensor (B, ...) repeated for ``n_rows = B * K`` rows (row b * K + k)."""
    B = t.shape[0]
    return t if n_rows == B else t.repeat_interleave(n_rows // B, 0)


def affine_back(layer, gc, gr, in_shape):
    """``A^T [gc -+ gr]``: centre ``A^T gc``, radius ``|A|^T gr`` plus the rounding margin
    ``gamma (|A|^T (|gc| + gr))`` of both computed quantities."""
    yc = layer.lin_t(gc, in_shape)
    if gr is None:
        yr = gamma(gc.dtype, layer.fan_t) * layer.abs_t(gc.abs(), in_shape)
    else:
        yr = layer.abs_t(gr, in_shape) + gamma(gc.dtype, layer.fan_t) * layer.abs_t(gc.abs() + gr, in_shape)
    return yc, yr


def relu_mult(gc, gr, active, inactive):
    """``d * g`` for every ``d`` in {1} (active), {0} (inactive) or [0, 1] (else) and every ``g``
    in the box: the exact interval hull is ``[min(0, lo), max(0, hi)]`` on unstable entries."""
    lo, hi = gc - gr, gc + gr
    ulo, uhi = lo.clamp_max(0), hi.clamp_min(0)
    uc = (ulo + uhi) / 2
    ur = (uhi - ulo) / 2 + 2 * torch.finfo(gc.dtype).eps * torch.maximum(ulo.abs(), uhi.abs())
    zero = torch.zeros_like(gc)
    c = torch.where(active, gc, torch.where(inactive, zero, uc))
    r = torch.where(active, gr, torch.where(inactive, zero, ur))
    return c, r
