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
* DEQ: the proved box of the DEQ node's bounds strategy (``lirpa_deq.bounds.relu_affine``, the
  same box as IBP / CROWN): the interval post-fixpoint (z*(u) is in it for every u of the
  injection box) or, where that proof fails (e.g. a MonDEQ with ``rho(|W|) >= 1``), the
  monotone-ball box (``lirpa_deq.bounds.ball_box``), sound for every cell guarantee. Then the
  pre-activation box of ``s = W z* + u`` widened by ``rounding_slack``; stable sets as for ReLU.
"""
from __future__ import annotations

import dataclasses

import torch

from ..bounds.interval import IntervalOptions, preactivation_box, rounding_slack
from ..bounds.relu_affine import ReLUAffineBounds
from .crown_region import tighten_deq
from .layers import bias_of, gamma


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
    box_method: str | None = None  # deq: 'interval' (post-fixpoint) or 'lipschitz' (monotone-ball fallback)
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


_BOX_METHOD = {"interval-post-fixpoint": "interval", "monotone-ball": "lipschitz"}


@torch.no_grad()
def deq_box(layer, u_c, u_r, interval_opts: IntervalOptions | None = None):
    """Proved box and stable sets of a DEQ layer for injections in ``u_c +- u_r`` (each (B, *state)).

    The box is the DEQ node's own bounds strategy (``ReLUAffineBounds.box``): the interval
    post-fixpoint, or, where it cannot be proved, the monotone-ball box (always allowed here:
    ``interval_opts.fallback`` is overridden to True, the fallback box being sound for every cell).
    Returns (op, (lo, hi), (s_lo, s_hi), how): op the cell's detached WeightOperator prepared for the
    state shape; (s_lo, s_hi) the pre-activation box of ``s = W z* + u`` widened by ``rounding_slack``;
    ``how`` is 'interval' (post-fixpoint) or 'lipschitz' (the monotone-ball box, which follows from
    the l2 Lipschitz constant ``1 / margin`` of ``u -> S z*(u)``). Raises IntervalProofError when
    even that box is not finite (weights or region too large for floating point)."""
    deq = layer.module
    opts = dataclasses.replace(interval_opts or IntervalOptions(), fallback=True)
    strategy = ReLUAffineBounds(deq, opts, {})
    params = dict(deq.cell.named_parameters())
    u_lo, u_hi = u_c - u_r, u_c + u_r
    lo, hi = strategy.box(u_lo, u_hi, params)
    op = strategy.operator(params, tuple(u_c.shape[1:]))
    s_lo, s_hi = preactivation_box(op, lo, hi, u_lo, u_hi)
    slack = rounding_slack(op, lo, hi, u_lo, u_hi)
    return op, (lo, hi), (s_lo - slack, s_hi + slack), _BOX_METHOD[strategy.info["box"]]


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
