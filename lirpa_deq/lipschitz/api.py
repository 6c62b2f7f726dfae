"""Public API: local Lipschitz bounds of specification rows, and certification from them.

See ``docs/lipschitz.md`` for the mathematics and the guarantees. Arguments are validated up
front (``lirpa_deq.validate``, ``options.py``): a bad argument raises ValueError before any work.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import torch

from .._progress import Progress
from ..training.losses import margin_spec as margin_rows
from .closed_form import global_bound
from .layers import flatten_model
from .options import LipschitzOptions, check_options
from .propagation import propagate
from .region import analyse
from .schur import refine_local
from ..validate import (check_bool, check_C, check_eps, check_input_shape, check_labels, check_matches_model,
                        check_method, check_norm, check_x)

METHODS = ("global", "elementwise", "local")  # looser and cheaper to tighter and dearer
NORMS = (math.inf, 2)
_DTYPES = (torch.float32, torch.float64)  # the dtypes whose rounding the analysis accounts for

__all__ = ["METHODS", "NORMS", "LipschitzOptions", "LipschitzReport", "LipschitzFallbackWarning",
           "lipschitz_report", "local_lipschitz", "certify_lipschitz", "margin_spec"]


class LipschitzFallbackWarning(RuntimeWarning):
    """A tighter bound was unavailable for some rows (no proof of ``rho(Dbar |W|) < 1``); the
    returned value there is the looser (still sound) bound of a cheaper method."""


@dataclasses.dataclass
class LipschitzReport:
    """Result of :func:`lipschitz_report`: ``bound`` (B, K) is the requested method's bound (the
    minimum with the cheaper methods' bounds, all sound); ``raw`` maps each computed method to its
    own (B, K) bound (inf where unavailable, never NaN); ``info`` holds diagnostics (unroll
    lengths, global factors per layer, DEQ box methods, unstable neuron counts, ...)."""

    bound: torch.Tensor   # (B, K): the requested method's bound (min with the cheaper methods)
    raw: dict             # method -> (B, K) that method's own bound (inf where unavailable)
    info: dict            # diagnostics: unroll lengths, global factors, DEQ box methods, ...


def no_nan(t):
    """A sound upper bound with NaN (no bound: e.g. an overflow) replaced by +inf."""
    return torch.where(torch.isnan(t), torch.full_like(t, math.inf), t)


def tightest(a, b):
    """Elementwise minimum of two sound upper bounds. NaN means "no bound" (treated as inf, so it
    cannot poison the other one: ``torch.minimum`` would propagate it); never returns NaN."""
    return no_nan(torch.fmin(a, b))  # fmin ignores a NaN operand


def margin_spec(labels, num_classes, x):
    """(B, num_classes - 1, num_classes) rows e_y - e_j for every j != y, in x's dtype / device.
    labels: integer (B,) in [0, num_classes - 1] (ValueError otherwise)."""
    x = check_x(x, dtypes=_DTYPES)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"certification needs at least 2 classes, the model has {num_classes}")
    labels = check_labels(labels, x.shape[0], int(num_classes), name="labels").to(x.device)
    return margin_rows(labels, int(num_classes)).to(x.dtype)


def _fallback(opts, what, rows):
    msg = (f"{what}: the {rows} row(s) got the looser bound of a cheaper method (no proof that "
           "rho(Dbar |W|) < 1 for a DEQ layer over the ball). Use an IBP-MonDEQ cell "
           "(IBPMonLinear/IBPMonConv2d), a smaller eps, or method='global'.")
    if opts.on_fallback == "raise":
        raise RuntimeError(msg)
    if opts.on_fallback == "warn":
        warnings.warn(msg, LipschitzFallbackWarning, stacklevel=4)


def _prepare(model, x, eps, norm, method, options, progress):
    """Validated (layers, shapes, out_shape, x, eps, norm, method, opts); ValueError otherwise."""
    norm, method, eps = check_norm(norm), check_method(method, METHODS, "method"), check_eps(eps)
    x = check_x(x, dtypes=_DTYPES).detach()
    opts = check_options(options)
    check_bool("progress", progress)
    layers = flatten_model(model)
    check_matches_model(x, model)
    shapes, out_shape = check_input_shape(layers, x)
    return layers, shapes, out_shape, x, eps, norm, method, opts


def _report(layers, shapes, out_shape, x, eps, norm, method, C, opts, bar):
    B, K, nc = C.shape
    rows = C.reshape(B * K, nc)
    info = {}
    bar.stage("global")
    raw = {"global": global_bound(layers, shapes, out_shape, rows, norm, info).view(B, K)}
    bound = raw["global"] = no_nan(raw["global"])
    if method != "global":
        bar.stage("region")
        region = analyse(layers, x, eps, norm, opts.interval, crown=opts.crown)
        info["deq_boxes"] = [lr.box_method for lr in region.per_layer if lr.box_method]
        info["unstable"] = [int((~(lr.active | lr.inactive)).sum()) for lr in region.per_layer
                            if lr.active is not None]
        pop = dict(norm=norm, max_unroll=opts.max_unroll, tail_rtol=opts.tail_rtol)
        for m in ("elementwise", "local")[: 1 + (method == "local")]:
            bar.stage(m)
            raw[m] = no_nan(propagate(region, shapes, rows, m, pop, info).view(B, K))
            if m == "local" and opts.refine:
                info["local_interval"] = raw[m]
                bar.stage("refine")
                ref = refine_local(region, shapes, rows, norm, opts.refine_max_state,
                                   opts.max_leaves, info, tick=bar.advance).view(B, K)
                info["local_refined"] = ref
                raw[m] = tightest(raw[m], ref)
            missing = int((~torch.isfinite(raw[m])).sum())
            if missing:
                _fallback(opts, f"method={m!r}", missing)
            bound = tightest(bound, raw[m])
    return LipschitzReport(bound=bound, raw=raw, info=info)


# --------------------------------------------------------------------------------------- API
def lipschitz_report(model, x, eps, norm=math.inf, method="local", C=None, options=None,
                     progress=False):
    """Like :func:`local_lipschitz`, returning a :class:`LipschitzReport` (raw per-method bounds
    and diagnostics) instead of the bare tensor."""
    layers, shapes, out_shape, x, eps, norm, method, opts = _prepare(model, x, eps, norm, method,
                                                                     options, progress)
    C = check_C(C, x.shape[0], out_shape[0], x)
    with Progress(progress, x.shape[0], "lipschitz", unit="img") as bar:
        rep = _report(layers, shapes, out_shape, x, eps, norm, method, C, opts, bar)
        bar.finish()
    return rep


def local_lipschitz(model, x, eps, norm=math.inf, method="local", C=None, options=None,
                    progress=False):
    """Upper bound on ``sup_{||x' - x||_norm <= eps} ||grad_x' (C_k . f(x'))||_dual`` for each
    specification row k: a tensor (B, K) (K = num_classes when C is None: each logit), never NaN
    (inf only if even the global bound overflows).

    x: (B, *input_shape) float32/float64, the model's dtype and device. C: None or
    (B, K, num_classes). method: 'global' (closed form, valid for all inputs), 'elementwise' or
    'local' (region bounds; each is also capped by the cheaper methods' bounds, all being sound).
    norm: math.inf (dual l1) or 2. options: None, a dict or :class:`LipschitzOptions`.
    progress: a tqdm bar on stderr (only when stderr is a terminal). Bad arguments: ValueError."""
    return lipschitz_report(model, x, eps, norm, method, C, options, progress).bound


def certify_lipschitz(model, x, labels, eps, norm=math.inf, method="local", options=None,
                      progress=False):
    """(certified (B,) bool, margin_lower (B,)) for integer ``labels`` (B,).

    margin_lower = min_{j != y} [lower bound of (f_y - f_j)(x)] - eps * Lip_{ball(x, eps)}(f_y - f_j),
    a sound lower bound on the worst margin over the ball (-inf where nothing is proved, never
    NaN); certified = margin_lower > 0. The margin at x is bounded soundly (the DEQ fixed point
    at x is enclosed by a proved box, not taken from the solver)."""
    layers, shapes, out_shape, x, eps, norm, method, opts = _prepare(model, x, eps, norm, method,
                                                                     options, progress)
    C = margin_spec(labels, out_shape[0], x)
    with Progress(progress, x.shape[0], "lipschitz", unit="img") as bar:
        L = _report(layers, shapes, out_shape, x, eps, norm, method, C, opts, bar).bound
        bar.stage("margin at x")
        with torch.no_grad():
            center = analyse(layers, x, 0.0, norm, opts.interval, crown=False)
            m_lo = (torch.einsum("bkc,bc->bk", C, center.out_c)
                    - torch.einsum("bkc,bc->bk", C.abs(), center.out_r))
            m_lo = m_lo - 4 * torch.finfo(x.dtype).eps * m_lo.abs()
            # eps = 0: the ball is the point x (0 * inf would be NaN)
            spread = torch.zeros_like(L) if eps == 0 else eps * L * (1 + 4 * torch.finfo(x.dtype).eps)
            worst = (m_lo - spread).min(1).values
            worst = torch.where(torch.isnan(worst), torch.full_like(worst, -math.inf), worst)
        bar.finish()
    return worst > 0, worst
