"""The box of a DEQ node's input u: what the DEQ bounds are proved over, checked before any proof.

auto_LiRPA represents an l_inf region as a box at every node, but an l_p ball (p < inf) only at the
perturbed input itself: the input node's interval is the zero-width (x, x) and the ball lives in
the perturbation object, which the norm-aware layers (Linear, MatMul, Conv) read. A DEQ node that
took (x, x) as its injection box would prove a box for the clean point only. So the node asks where
its input comes from (:func:`input_region`):

* ``'box'``: every perturbed path into u passes a norm-aware layer first (or the region is l_inf):
  auto_LiRPA's bounds of u are a box containing every reachable u; used as they are;
* ``'ball'``: u is the perturbed input itself, possibly through shape-only operators (reshape,
  flatten, squeeze, transpose, slice, which copy coordinates): every coordinate of u stays within
  eps of its clean value (|d_i| <= ||d||_p for p >= 1), so the box is u_clean -/+ eps -- the
  smallest box containing the ball;
* anything else (an l_p ball through an elementwise operator, an L0 or unknown perturbation) is
  refused with :class:`UnsupportedRegionError`: auto_LiRPA's intervals there do not enclose the ball.

:func:`checked_box` then refuses boxes no proof should start from: non-finite bounds (NaN/inf
input, eps or weights before the DEQ) and inverted ones (a negative eps), naming the likely cause.
"""
from __future__ import annotations

import math

import torch
from auto_LiRPA import PerturbationLpNorm

from .._compat import bound_classes
from ..validate import check_dtype

NORM_AWARE = bound_classes("BoundLinear", "BoundMatMul", "BoundConv")
SHAPE_ONLY = bound_classes("BoundReshape", "BoundFlatten", "BoundUnsqueeze", "BoundSqueeze",
                           "BoundTranspose", "BoundSlice", "BoundIdentity")
INPUT_NODES = bound_classes("BoundInput")


class UnsupportedRegionError(NotImplementedError):
    """The perturbation region reaching a DEQ node cannot be bounded soundly as a box."""


def _lp(ptb):
    return isinstance(ptb, PerturbationLpNorm)


def _classify(node, memo):
    """('const' | 'box' | ('ball', root) | ('unsupported', why)) for the region of ``node``."""
    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, INPUT_NODES):
        ptb = getattr(node, "perturbation", None)
        if ptb is None or not getattr(node, "perturbed", True):
            result = "const"
        elif _lp(ptb) and ptb.norm == math.inf:
            result = "box"
        elif _lp(ptb) and 1 <= ptb.norm < math.inf:
            result = ("ball", node)
        else:
            result = ("unsupported", f"a {type(ptb).__name__} perturbation of input {node.name!r}")
    elif not getattr(node, "perturbed", True):
        result = "const"
    elif isinstance(node, SHAPE_ONLY):
        result = _classify(node.inputs[0], memo)
        if any(_classify(n, memo) != "const" for n in node.inputs[1:]):
            result = ("unsupported", f"a perturbed shape argument of {type(node).__name__}")
    else:
        parts = [_classify(n, memo) for n in node.inputs]
        bad = [p for p in parts if isinstance(p, tuple) and p[0] == "unsupported"]
        balls = [p for p in parts if isinstance(p, tuple) and p[0] == "ball"]
        if bad:
            result = bad[0]
        elif balls and not (isinstance(node, NORM_AWARE) and parts[0] == balls[0]
                            and all(p == "const" for p in parts[1:])):
            result = ("unsupported", f"an l_{balls[0][1].perturbation.norm:g} ball through "
                      f"{type(node).__name__} (only Linear/MatMul/Conv layers bound a ball norm-aware)")
        else:
            result = "box"
    memo[key] = result
    return result


def input_region(node):
    """How the input region reaches ``node`` (a BoundDEQ's input node): 'box', ('ball', root) or
    ('unsupported', why); see the module docstring."""
    return _classify(node, {})


def _per_sample(eps, like):
    """eps (float or tensor: one value, or one per sample) as a tensor broadcastable to ``like``."""
    eps_t = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    if eps_t.numel() == 1:
        return eps_t.reshape((1,) * like.dim())
    if eps_t.dim() >= 1 and eps_t.shape[0] == like.shape[0] and eps_t.numel() == like.shape[0]:
        return eps_t.reshape((-1,) + (1,) * (like.dim() - 1))
    raise UnsupportedRegionError(
        f"an l_p ball with an elementwise eps of shape {tuple(eps_t.shape)} reaches a DEQ layer directly; "
        "use one eps per sample, or put a Linear/Conv layer before the DEQ")


def injection_box(u_node, u_lo, u_hi, center=None):
    """The box (lo, hi) of the DEQ input u over the whole input region, each (B, *state).

    u_node: the BoundDEQ's input node; (u_lo, u_hi): auto_LiRPA's bounds of it; center: the clean
    value of u (default: the node's forward value, else the box centre). Sound by the module doc's
    case analysis; raises UnsupportedRegionError where no box can be read off."""
    region = input_region(u_node)
    if region in ("box", "const"):
        return u_lo, u_hi
    if region[0] == "unsupported":
        raise UnsupportedRegionError(
            f"cannot bound the input of a DEQ layer: {region[1]} reaches it, and auto_LiRPA's interval "
            "there does not enclose the ball. Put a Linear or Conv layer between the perturbed input and "
            "the DEQ layer (they bound the ball norm-aware), or use an l_inf perturbation.")
    eps = region[1].perturbation.eps
    if center is None:
        fv = getattr(u_node, "forward_value", None)
        center = fv if isinstance(fv, torch.Tensor) and fv.shape == u_lo.shape else (u_lo + u_hi) / 2
    center = center.to(u_lo.dtype)
    radius = _per_sample(eps, center)
    if not bool(torch.isfinite(radius).all() and (radius >= 0).all()):
        raise ValueError(f"eps of the perturbation must be finite and >= 0, got {eps!r}")
    return center - radius, center + radius


def checked_box(u_lo, u_hi, params):
    """(u_lo, u_hi), refusing boxes that no proof may start from (ValueError naming the cause):
    non-finite bounds or cell parameters, a dtype other than the cell's, bounds inverted by more
    than rounding (a negative eps). Inversions within rounding are resolved by min / max."""
    check_dtype(u_lo, list(params.values()))
    for name, value in params.items():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"the DEQ cell's parameter {name!r} contains NaN or inf: no bound can be proved; "
                             "check the training run (learning rate, divergence) or the loaded checkpoint")
    if not bool(torch.isfinite(u_lo).all() and torch.isfinite(u_hi).all()):
        raise ValueError("the bounds of the DEQ layer's input contain NaN or inf: check the input x, the "
                         "perturbation's eps and the weights of the layers before the DEQ for NaN / inf")
    tol = 64 * torch.finfo(u_lo.dtype).eps * (1 + torch.maximum(u_lo.abs(), u_hi.abs()))
    gap = u_lo - u_hi
    if bool((gap > tol).any()):
        raise ValueError(f"the lower bound of the DEQ layer's input exceeds its upper bound (by up to "
                         f"{float(gap.detach().max()):.3g}): is eps negative? Use eps >= 0 (and x_L <= x_U)")
    return torch.minimum(u_lo, u_hi), torch.maximum(u_lo, u_hi)
