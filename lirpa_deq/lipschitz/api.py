"""Public API: local Lipschitz bounds of specification rows, and certification from them.

See ``docs/lipschitz.md`` for the mathematics and the guarantees.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import torch

from ..bounds.interval import IntervalOptions
from .closed_form import global_bound
from .layers import flatten_model
from .propagation import propagate
from .region import analyse, shapes_of
from .schur import refine_local

METHODS = ("global", "elementwise", "local")
NORMS = (math.inf, 2)


class LipschitzFallbackWarning(RuntimeWarning):
    """A tighter bound was unavailable for some rows (no proof of ``rho(Dbar |W|) < 1``); the
    returned value there is the looser (still sound) bound of a cheaper method."""


@dataclasses.dataclass
class LipschitzOptions:
    """max_unroll / tail_rtol: the local method's unrolled DEQ steps (stop once the proven tail is
    below ``tail_rtol`` times the enclosure's l1 size). refine / refine_max_state / max_leaves:
    the local method's exact elimination of stable DEQ neurons with enumeration of up to
    ``max_leaves`` relu' patterns of the unstable ones (``schur.py``; dense states up to
    ``refine_max_state``). crown: tighten DEQ pre-activation bounds by the adjoint linear bound.
    interval: options of the DEQ interval proof. on_fallback: 'warn' | 'ignore' | 'raise' when a
    method falls back to a cheaper one."""

    max_unroll: int = 500
    tail_rtol: float = 1e-6
    refine: bool = True
    refine_max_state: int = 1024
    max_leaves: int = 1024
    crown: bool = True
    interval: IntervalOptions | None = None
    on_fallback: str = "warn"

    def __post_init__(self):
        for name in ("max_unroll", "refine_max_state", "max_leaves"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.tail_rtol, numbers.Real) and self.tail_rtol > 0):
            raise ValueError(f"tail_rtol must be a number > 0, got {self.tail_rtol!r}")
        if self.on_fallback not in ("warn", "ignore", "raise"):
            raise ValueError(f"on_fallback must be 'warn', 'ignore' or 'raise', got {self.on_fallback!r}")


@dataclasses.dataclass
class LipschitzReport:
    """Result of :func:`lipschitz_report`: ``bound`` (B, K) is the requested method's bound (the
    minimum with the cheaper methods' bounds, all sound); ``raw`` maps each computed method to its
    own (B, K) bound (inf where unavailable); ``info`` holds diagnostics (unroll lengths, global
    factors per layer, DEQ box methods, unstable neuron counts, ...)."""

    bound: torch.Tensor   # (B, K): the requested method's bound (min with the cheaper methods)
    raw: dict             # method -> (B, K) that method's own bound (inf where unavailable)
    info: dict            # diagnostics: unroll lengths, global factors, DEQ box methods, ...


# ---------------------------------------------------------------------------------- validation
def check_norm(norm):
    if isinstance(norm, str):
        key = norm.strip().lower()
        table = {"inf": math.inf, "linf": math.inf, "l_inf": math.inf, "2": 2, "l2": 2}
        if key in table:
            return table[key]
    elif isinstance(norm, numbers.Real) and not isinstance(norm, bool):
        if norm == math.inf:
            return math.inf
        if norm == 2:
            return 2
    raise ValueError(f"norm must be math.inf (l_inf ball, dual l1) or 2 (l2 ball), got {norm!r}")


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return method


def check_eps(eps):
    if isinstance(eps, torch.Tensor) and eps.numel() == 1:
        eps = float(eps)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}")
    return float(eps)


def check_x(x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (B, *input_shape), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    return x


def _check_model(model, x):
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and (p.dtype != x.dtype or p.device != x.device):
            raise ValueError(f"model tensor {name!r} is {p.dtype} on {p.device} but x is {x.dtype} "
                             f"on {x.device}; move the model with model.to(x) first")


def _outputs(model, x):
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"the model cannot be applied to x of shape {tuple(x.shape)}: {e}") from e
    if out.dim() != 2:
        raise ValueError(f"the model must return logits of shape (B, num_classes), got {tuple(out.shape)}")
    return out


def check_C(C, B, num_classes, x):
    if C is None:
        return torch.eye(num_classes, dtype=x.dtype, device=x.device).expand(B, -1, -1)
    if not isinstance(C, torch.Tensor) or C.dim() != 3 or C.shape[0] != B or C.shape[2] != num_classes:
        shape = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
        raise ValueError(f"C must be a tensor of shape (B={B}, K, num_classes={num_classes}), got {shape}")
    if C.shape[1] == 0:
        raise ValueError("C has no specification rows (K = 0)")
    if not torch.isfinite(C).all():
        raise ValueError("C contains NaN or infinite values")
    return C.to(dtype=x.dtype, device=x.device)


def margin_spec(labels, num_classes, x):
    """(B, num_classes - 1, num_classes) rows e_y - e_j for every j != y."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be a tensor of shape (B={x.shape[0]},)")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if num_classes < 2:
        raise ValueError("certification needs at least 2 classes")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    from ..training.losses import margin_spec as margin_rows

    return margin_rows(labels.to(x.device), num_classes).to(x.dtype)


def _options(options):
    if options is None:
        return LipschitzOptions()
    if isinstance(options, dict):
        valid = {f.name for f in dataclasses.fields(LipschitzOptions)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid: {sorted(valid)}")
        return LipschitzOptions(**options)
    if isinstance(options, LipschitzOptions):
        return options
    raise ValueError(f"options must be None, a dict or LipschitzOptions, got {type(options).__name__}")


def _fallback(opts, what, rows):
    msg = (f"{what}: the {rows} row(s) got the looser bound of a cheaper method (no proof that "
           "rho(Dbar |W|) < 1 for a DEQ layer over the ball). Use an IBP-MonDEQ cell "
           "(IBPMonLinear/IBPMonConv2d), a smaller eps, or method='global'.")
    if opts.on_fallback == "raise":
        raise RuntimeError(msg)
    if opts.on_fallback == "warn":
        warnings.warn(msg, LipschitzFallbackWarning, stacklevel=4)


# --------------------------------------------------------------------------------------- API
def lipschitz_report(model, x, eps, norm=math.inf, method="local", C=None, options=None):
    """Like :func:`local_lipschitz`, returning a :class:`LipschitzReport` (raw per-method bounds
    and diagnostics) instead of the bare tensor."""
    norm, method, eps, x = check_norm(norm), check_method(method), check_eps(eps), check_x(x)
    opts = _options(options)
    layers = flatten_model(model)
    _check_model(model, x)
    out = _outputs(model, x)
    B, nc = out.shape
    C = check_C(C, B, nc, x)
    K = C.shape[1]
    rows = C.reshape(B * K, nc)
    shapes, out_shape = shapes_of(layers, x)
    info = {}
    raw = {"global": global_bound(layers, shapes, out_shape, rows, norm, info).view(B, K)}
    bound = raw["global"]
    if method != "global":
        region = analyse(layers, x, eps, norm, opts.interval, crown=opts.crown)
        info["deq_boxes"] = [lr.box_method for lr in region.per_layer if lr.box_method]
        info["unstable"] = [int((~(lr.active | lr.inactive)).sum()) for lr in region.per_layer
                            if lr.active is not None]
        pop = dict(norm=norm, max_unroll=opts.max_unroll, tail_rtol=opts.tail_rtol)
        for m in ("elementwise", "local")[: 1 + (method == "local")]:
            raw[m] = propagate(region, shapes, rows, m, pop, info).view(B, K)
            if m == "local" and opts.refine:
                info["local_interval"] = raw[m]
                ref = refine_local(region, shapes, rows, norm, opts.refine_max_state,
                                   opts.max_leaves, info).view(B, K)
                info["local_refined"] = ref
                raw[m] = torch.minimum(raw[m], ref)
            missing = int((~torch.isfinite(raw[m])).sum())
            if missing:
                _fallback(opts, f"method={m!r}", missing)
            bound = torch.minimum(bound, raw[m])
    return LipschitzReport(bound=bound, raw=raw, info=info)


def local_lipschitz(model, x, eps, norm=math.inf, method="local", C=None, options=None):
    """Upper bound on ``sup_{||x' - x||_norm <= eps} ||grad_x' (C_k . f(x'))||_dual`` for each
    specification row k: a tensor (B, K) (K = num_classes when C is None: each logit).

    method: 'global' (closed form, valid for all inputs), 'elementwise' or 'local' (region bounds;
    each is also capped by the cheaper methods' bounds, all being sound). norm: math.inf (dual l1)
    or 2. options: None, a dict or :class:`LipschitzOptions`."""
    return lipschitz_report(model, x, eps, norm, method, C, options).bound


def certify_lipschitz(model, x, labels, eps, norm=math.inf, method="local", options=None):
    """(certified (B,) bool, margin_lower (B,)).

    margin_lower = min_{j != y} [lower bound of (f_y - f_j)(x)] - eps * Lip_{ball(x, eps)}(f_y - f_j),
    a sound lower bound on the worst margin over the ball; certified = margin_lower > 0. The
    margin at x is bounded soundly (the DEQ fixed point at x is enclosed by a proved box, not taken
    from the solver)."""
    eps, x = check_eps(eps), check_x(x)
    out = _outputs(model, x)
    C = margin_spec(labels, out.shape[1], x)
    L = local_lipschitz(model, x, eps, norm, method, C, options)
    layers = flatten_model(model)
    with torch.no_grad():
        center = analyse(layers, x, 0.0, check_norm(norm), _options(options).interval, crown=False)
        m_lo = (torch.einsum("bkc,bc->bk", C, center.out_c)
                - torch.einsum("bkc,bc->bk", C.abs(), center.out_r))
        m_lo = m_lo - 4 * torch.finfo(x.dtype).eps * m_lo.abs()
        worst = (m_lo - eps * L * (1 + 4 * torch.finfo(x.dtype).eps)).min(1).values
    return worst > 0, worst
