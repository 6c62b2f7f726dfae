"""Sound interval bounds on every layer's input over the ball, and the DEQ layers' proved boxes.

``analyse(layers, x, eps, norm)`` runs interval arithmetic (centre ``c``, radius ``r``) through the
layers and records, per layer, its input shape and box. The sets it encloses:

* input: l_inf ball = the box ``x +- eps``; l2 ball: enclosed by that box, but the first
  Linear / Conv2d / BatchNorm (after any Flatten / Identity) gets the exact per-output radius
  ``eps * ||row_i(A)||_2`` (Cauchy-Schwarz, attained), from ``sqrt((A o A) 1)``.
* affine ``y = A x + b``: ``[A c + b -+ (|A| r + slack)]``, slack = ``gamma_n (|A|(|c| + r) + |b|)``
  covers the floating-point error of the computed centre and radius.
* ReLU: ``[relu(c - r), relu(c + r)]``; input box gives the stable sets (``lo >= 0``: relu is the
  identity on every value it sees, derivative 1; ``hi <= 0``: it is constant 0, derivative 0).
* DEQ: ``prove_interval_fixed_point`` (a post-fixpoint, so z*(u) is in the returned box for every
  u of the injection box), then the pre-activation box of ``s = W z* + u`` widened by
  ``rounding_slack``; stable sets as for ReLU. If the interval proof fails (e.g. a MonDEQ with
  ``rho(|W|) >= 1``), the box from the closed-form l2 Lipschitz constant (``lipschitz_box``) is
  used instead; it is sound for every cell guarantee.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..bounds.interval import (IntervalOptions, IntervalProofError, preactivation_box,
                               prove_interval_fixed_point, rounding_slack)
from .closed_form import deq_opnorm
from .crown_region import tighten_deq
from .layers import bias_of, gamma
from .neumann import state_fan


@dataclasses.dataclass
class LayerRegion:
    in_shape: tuple            # per-sample input shape
    c: torch.Tensor            # (B, *in_shape) centre of the input box
    r: torch.Tensor            # (B, *in_shape) radius (>= 0)
    active: torch.Tensor | None = None     # relu / deq: derivative 1 over the whole ball
    inactive: torch.Tensor | None = None   # relu / deq: derivative 0 over the whole ball
    op: object = None          # deq: the cell's WeightOperator
    z_box: tuple | None = None  # deq: proved (lo, hi) of z*
    s_box: tuple | None = None  # deq: pre-activation box (rounding included)
    box_method: str | None = None  # deq: 'interval' (post-fixpoint) or 'lipschitz' (fallback)
    cache: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Region:
    layers: list
    per_layer: list            # LayerRegion for each layer
    out_shape: tuple
    out_c: torch.Tensor        # box of the model output over the ball
    out_r: torch.Tensor


def _box_from(lo, hi):
    """Centre / radius of [lo, hi] with a margin for the rounding of the two divisions."""
    c = (lo + hi) / 2
    r = (hi - lo) / 2 + 2 * torch.finfo(lo.dtype).eps * torch.maximum(lo.abs(), hi.abs())
    return c, r


def _affine(layer, c, r):
    yc = layer.lin(c)
    b = bias_of(layer, yc)
    if b is not None:
        yc = yc + b
    mag = layer.abs_lin(c.abs() + r)
    if b is not None:
        mag = mag + b.abs()
    yr = layer.abs_lin(r) + gamma(c.dtype, layer.fan_in) * mag
    return yc, yr


def lipschitz_box(layer, op, u_c, u_r):
    """A sound box of z*(u) for every u in ``u_c +- u_r`` from the closed-form l2 Lipschitz
    constant ``L2`` of ``u -> z*`` (``closed_form.deq_opnorm``), for any cell guarantee.

    With ``z~`` the solver's answer at ``u_c`` and ``z' = relu(W z~ + u_c)``, ``z'`` is EXACTLY the
    fixed point for the injection ``u_c + delta``, ``delta = W (z~ - z')`` (plus the rounding of
    ``W z~ + u_c``, bounded by ``gamma |W| |z~| + |u_c|`` terms). Hence
    ``||z' - z*(u)||_2 <= L2 (||delta||_2 + ||u - u_c||_2)`` for every u of the box."""
    state = tuple(u_c.shape[1:])
    L2, _ = deq_opnorm(layer, state, 2, u_c)
    z_t = layer.module.solve(u_c)
    pre = op.W(z_t) + u_c
    z1 = torch.relu(pre)
    delta = op.W(z_t - z1)
    rnd = gamma(u_c.dtype, state_fan(state)) * (op.absW(z_t.abs() + z1.abs()) + u_c.abs())
    size = (delta.abs() + rnd).flatten(1).norm(dim=1) + u_r.flatten(1).norm(dim=1)
    rho = (L2 * size * (1 + gamma(u_c.dtype, math.prod(state)))).view((-1,) + (1,) * len(state))
    return (z1 - rho).clamp_min(0), z1 + rho


@torch.no_grad()
def deq_box(layer, u_c, u_r, interval_opts: IntervalOptions | None = None):
    """Proved box and stable sets of a DEQ layer for injections in ``u_c +- u_r``.

    Returns (op, (lo, hi), (s_lo, s_hi), how): ``how`` is 'interval' (post-fixpoint proof) or
    'lipschitz' (``lipschitz_box``, used when the interval proof fails)."""
    deq = layer.module
    op = deq.cell.operator()
    op.prepare(tuple(u_c.shape[1:]))
    u_lo, u_hi = u_c - u_r, u_c + u_r
    z_mid = deq.solve(u_c)
    try:
        lo, hi, _ = prove_interval_fixed_point(op, u_lo, u_hi, z_start=z_mid, opts=interval_opts)
        how = "interval"
    except IntervalProofError:
        lo, hi = lipschitz_box(layer, op, u_c, u_r)
        how = "lipschitz"
    s_lo, s_hi = preactivation_box(op, lo, hi, u_lo, u_hi)
    slack = rounding_slack(op, lo, hi, u_lo, u_hi)
    return op, (lo, hi), (s_lo - slack, s_hi + slack), how


@torch.no_grad()
def analyse(layers, x, eps, norm, interval_opts: IntervalOptions | None = None,
            crown: bool = True) -> Region:
    """Boxes of every layer's input over the ball (module docstring). crown: tighten the DEQ
    pre-activations with the adjoint linear bound (``crown_region``)."""
    c = x.detach()
    r = torch.full_like(c, float(eps))
    lo, hi = c - r, c + r  # exact bounds of the current layer input (kept for ReLU stability)
    l2_pending = norm == 2 and eps > 0
    affine_prefix = []  # affine layers from the input so far (None once a nonlinearity is seen)
    per = []
    for layer in layers:
        lr = LayerRegion(tuple(c.shape[1:]), c, r)
        per.append(lr)
        reshape = type(layer).__name__ == "_Reshape"
        if layer.kind == "affine":
            if l2_pending and reshape:  # still the input coordinates: keep the plain box
                c, r = layer.lin(c), layer.lin(r)
            elif l2_pending and layer.sq_lin is not None:  # exact l2 radius of the first map
                c, r = _affine(layer, c, torch.zeros_like(r))
                rows = layer.sq_lin(torch.ones_like(lr.c)).clamp_min(0).sqrt()
                r = r + float(eps) * rows * (1 + gamma(c.dtype, layer.fan_in))
                l2_pending = False
            else:
                l2_pending = False
                c, r = _affine(layer, c, r)
        elif layer.kind == "relu":
            l2_pending = False
            lr.active, lr.inactive = lo >= 0, hi <= 0
            c, r = _box_from(torch.relu(lo), torch.relu(hi))
        else:  # deq
            op, (lo, hi), s_box, how = deq_box(layer, c, r, interval_opts)
            lr.op, lr.z_box, lr.box_method = op, (lo, hi), how
            if crown:
                s_box = tighten_deq(lr, s_box, affine_prefix, x, eps, norm)
                lo = torch.maximum(lo, torch.relu(s_box[0]))
                hi = torch.minimum(hi, torch.relu(s_box[1]))
                lr.z_box = (lo, hi)
            lr.s_box = s_box
            lr.active, lr.inactive = s_box[0] >= 0, s_box[1] <= 0
            l2_pending = False
            c, r = _box_from(lo, hi)
        if reshape:
            lo, hi = layer.lin(lo), layer.lin(hi)
        elif layer.kind == "affine":
            lo, hi = c - r, c + r
        elif layer.kind == "relu":
            lo, hi = torch.relu(lo), torch.relu(hi)
        if layer.kind == "affine" and affine_prefix is not None:
            affine_prefix.append((layer, lr.in_shape))
        else:
            affine_prefix = None
    return Region(layers, per, tuple(c.shape[1:]), c, r)
