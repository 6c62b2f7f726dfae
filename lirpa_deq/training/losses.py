"""Losses of certified training and the margin lower bounds they are built on.

Specification: ``C`` with rows ``e_y - e_j`` for every ``j != y`` (shape (B, K-1, K)), so
``C f(x')`` are the K-1 margins of the true class; the point is certified when all their lower
bounds are > 0 over the perturbation set. The set is the l_p ball of radius eps intersected with
the data domain [clip_min, clip_max] (l_inf: auto_LiRPA's ``x_L``/``x_U``; sound for every image
of the domain; PGD uses the same set).

* natural loss: cross-entropy of the logits;
* robust loss (Wong & Kolter; Gowal et al.): cross-entropy of ``[0, -lb]`` with target 0, i.e.
  ``log(1 + sum_j exp(-lb_j))``: an upper bound on the worst-case CE over the set (as lb is a
  lower bound on the margins);
* total: ``kappa * natural + (1 - kappa) * robust``; CROWN-IBP mixes its lower bound with IBP's,
  ``lb = beta * lb_CROWN-IBP + (1 - beta) * lb_IBP`` (Zhang et al. 2020).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from .._compat import copy_buffers

from ..validate import (BOUND_METHODS, check_clip, check_eps, check_labels, check_method, check_norm,
                        check_num_classes, check_unit, check_x)

METHODS = ("natural", "ibp", "crown-ibp")


def margin_spec(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C of shape (B, K-1, K) with rows e_y - e_j, j != y in increasing order (float32, on
    labels.device)."""
    labels = labels.long()
    B, K = labels.shape[0], int(num_classes)
    eye = torch.eye(K, device=labels.device)
    others = torch.arange(K, device=labels.device).expand(B, K)
    others = others[others != labels.view(-1, 1)].view(B, K - 1)
    return eye[labels].unsqueeze(1) - eye[others]


def robust_ce(lb: torch.Tensor) -> torch.Tensor:
    """Mean of log(1 + sum_j exp(-lb_j)); lb: (B, K-1) margin lower bounds."""
    z = torch.cat([torch.zeros_like(lb[:, :1]), -lb], 1)
    return F.cross_entropy(z, torch.zeros(lb.shape[0], dtype=torch.long, device=lb.device))


def bound_opts_for(model, deq_opts=None) -> dict:
    """auto_LiRPA bound_opts for ``model``: ``{'deq': deq_opts}`` (a copy; None: ``{}``, the defaults
    of :class:`lirpa_deq.bounds.IntervalOptions`)."""
    return {"deq": dict(deq_opts or {})}


def make_bounded(model, example: torch.Tensor, deq_opts=None) -> BoundedModule:
    """``BoundedModule(model, example[:1])`` with :func:`bound_opts_for`; parameters are shared
    with ``model`` (buffers such as BN running statistics are NOT: see ``sync_buffers``). The
    model is traced in eval mode (BatchNorm1d cannot run a batch of 1 in training mode) and left
    in the mode it had; the BoundedModule starts in eval mode (call ``.train()`` for training)."""
    was_training = model.training
    model.eval()
    try:
        bounded = BoundedModule(model, example[:1], bound_opts=bound_opts_for(model, deq_opts),
                                device=str(example.device))
    finally:
        model.train(was_training)
    bounded.eval()
    return bounded


@torch.no_grad()
def sync_buffers(bounded: BoundedModule, model) -> None:
    """Copy the BoundedModule's buffers (BN running statistics) into ``model`` in place
    (``lirpa_deq._compat.copy_buffers``: RuntimeError if one has no counterpart in ``model``)."""
    copy_buffers(bounded, model, into="model")


def perturbation(x, eps, norm=math.inf, clip=(0.0, 1.0)) -> PerturbationLpNorm:
    """The l_norm ball of radius eps around x, intersected with the box ``clip`` for l_inf
    (``clip=None``: no domain constraint)."""
    if norm == math.inf and clip is not None:
        return PerturbationLpNorm(norm=norm, eps=eps, x_L=(x - eps).clamp(*clip), x_U=(x + eps).clamp(*clip))
    return PerturbationLpNorm(norm=norm, eps=eps)


def margin_lower_bounds(bounded, x, labels, eps, method="IBP", num_classes=10, norm=math.inf,
                        clip=(0.0, 1.0), beta=1.0):
    """Lower bounds (B, K-1) on the margins f_y - f_j over the perturbation set.

    x (B, *input_shape) of the dtype / device of ``bounded``'s parameters, inside ``clip``; labels
    (B,) integers in [0, num_classes); eps a finite real >= 0; method: 'IBP', 'CROWN', 'CROWN-IBP'
    (mixed with IBP by ``beta`` in [0, 1]), 'CROWN-Optimized' (any case). Every argument is
    validated first (ValueError saying what is wrong, see ``validate``). For 'CROWN' and
    'CROWN-Optimized' the result is the elementwise max with the IBP bound (both are sound, so the
    max is too: never worse than IBP). Differentiable for 'IBP' / 'CROWN-IBP'."""
    eps, method, norm, clip = check_eps(eps), check_method(method, BOUND_METHODS), check_norm(norm), check_clip(clip)
    num_classes, beta = check_num_classes(num_classes), check_unit("beta", beta)
    x = check_x(x, bounded, clip)
    labels = check_labels(labels, len(x), num_classes, x.device, name="labels")
    return _margin_lower_bounds(bounded, x, labels, eps, method, num_classes, norm, clip, beta)


def _margin_lower_bounds(bounded, x, labels, eps, method, num_classes, norm, clip, beta=1.0):
    """:func:`margin_lower_bounds` on VALIDATED arguments (``method`` a canonical BOUND_METHODS name)."""
    C = margin_spec(labels, num_classes)
    bx = BoundedTensor(x, perturbation(x, eps, norm, clip))
    m = method.upper()
    ilb, _ = bounded.compute_bounds(x=(bx,), C=C, method="IBP", bound_upper=False)
    if m == "IBP":
        return ilb
    if m == "CROWN-IBP":
        if beta <= 0:
            return ilb
        clb, _ = bounded.compute_bounds(C=C, IBP=False, method="backward", bound_upper=False)
        return beta * clb + (1 - beta) * ilb
    clb, _ = bounded.compute_bounds(x=(bx,), C=C, method=method, bound_upper=False)
    return torch.maximum(clb, ilb)


def certified_loss(bounded, x, y, eps, method, kappa=1.0, beta=1.0, num_classes=10, norm=math.inf,
                   clip=(0.0, 1.0)):
    """One training loss. Returns (loss, stats) with stats = {'natural', 'robust', 'clean_acc',
    'verified'} (python floats; 'robust'/'verified' are None at eps = 0 or method 'natural').

    x (B, *input_shape) in ``clip``, y (B,) labels, eps a finite real >= 0, kappa / beta in [0, 1]:
    validated first (ValueError). The clean forward runs through ``bounded`` first (it also sets BN
    batch statistics for the bounds in training mode). method: 'natural', 'ibp', 'crown-ibp'."""
    method = check_method(method, METHODS, "training method")
    eps, norm, clip = check_eps(eps), check_norm(norm), check_clip(clip)
    kappa, beta, num_classes = check_unit("kappa", kappa), check_unit("beta", beta), check_num_classes(num_classes)
    x = check_x(x, bounded, clip)
    y = check_labels(y, len(x), num_classes, x.device)
    logits = bounded(x)
    natural = F.cross_entropy(logits, y)
    stats = {"natural": float(natural.detach()), "clean_acc": float((logits.argmax(1) == y).float().mean()),
             "robust": None, "verified": None}
    if method == "natural" or eps <= 0 or kappa >= 1:
        return natural, stats
    lb = _margin_lower_bounds(bounded, x, y, eps, "IBP" if method == "ibp" else "CROWN-IBP", num_classes,
                              norm, clip, beta=beta)
    robust = robust_ce(lb)
    stats["robust"] = float(robust.detach())
    stats["verified"] = float((lb.detach().min(1).values > 0).float().mean())
    return kappa * natural + (1 - kappa) * robust, stats
