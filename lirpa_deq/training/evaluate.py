"""Evaluation of (certifiably) trained models: clean accuracy, PGD accuracy, bound certificates.

Perturbation set everywhere: the l_norm ball of radius eps around x intersected with the data
domain ``clip`` (default [0, 1]), as in training (``losses.perturbation``).

* :func:`pgd_robust` -- PGD with a margin (CW) loss, random starts; returns which points
  resisted. PGD accuracy is an UPPER bound on any sound certified accuracy of the same model.
* :func:`certify_bounds` -- certified (B,) and the margin lower bound (B,) (min over j != y of a
  lower bound on f_y - f_j) from auto_LiRPA bounds ('IBP', 'CROWN' -- CROWN is intersected with
  IBP --, 'CROWN-IBP', 'CROWN-Optimized'). A point is certified iff its margin lower bound is > 0;
  the guarantee is that of the bound (proved for the DEQ node: ``docs/crown.md``, ``docs/ibp.md``).

Every function validates its input first (``validate``; ValueError saying what is wrong and how to
fix it): no number is returned for a negative / NaN eps, a NaN input, a dtype other than the
model's, labels of the wrong shape or range, an unknown method or a model with NaN weights.
"""
from __future__ import annotations

import math

import torch

from .._progress import Progress
from ..testing import ascent_step, project
from .losses import _margin_lower_bounds, make_bounded
from ..validate import (BOUND_METHODS, check_clip, check_eps, check_finite_params, check_labels, check_logits,
                        check_method, check_norm, check_num_classes, check_positive_int, check_x)


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """argmax predictions (B,) of ``model`` on x (B, *input_shape) (finite, the model's dtype), in batches."""
    x = check_x(x, model)
    batch_size = check_positive_int("batch_size", batch_size)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def pgd_robust(model, x, y, eps, steps=20, restarts=1, norm=math.inf, clip=(0.0, 1.0), step_size=None,
               batch_size=500, seed=0, progress=False) -> torch.Tensor:
    """Bool (B,): True where the model classifies x correctly AND no PGD attack (``restarts``
    random starts, ``steps`` steps of size ``step_size`` (default 2.5 eps / steps), loss = max_j
    f_j - f_y) found a misclassified point of the perturbation set.

    x (B, *input_shape) finite, of the model's dtype / device, inside ``clip``; y (B,) labels in
    [0, number of logits); eps a finite real >= 0 (validated first: ValueError). ``progress``:
    a tqdm bar over the attack steps (shown only when stderr is a TTY)."""
    eps, norm, clip = check_eps(eps), check_norm(norm), check_clip(clip)
    steps, restarts = check_positive_int("steps", steps), check_positive_int("restarts", restarts)
    batch_size = check_positive_int("batch_size", batch_size)
    if step_size is not None and not (isinstance(step_size, (int, float)) and math.isfinite(step_size)
                                      and step_size > 0):
        raise ValueError(f"step_size must be None or a finite number > 0, got {step_size!r}")
    check_finite_params(model)
    x = check_x(x, model, clip)
    y = check_labels(y, len(x), check_logits(model, x[:1]), x.device)
    g = torch.Generator(device=x.device).manual_seed(seed)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    runs = restarts if eps > 0 else 0
    bar = Progress(progress, math.ceil(len(x) / batch_size) * runs * steps, f"PGD eps={eps:g}", unit="step")
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            with torch.no_grad():
                ok = model(xb).argmax(1) == yb
            for _ in range(runs):
                noise = torch.rand(xb.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1
                if norm != math.inf:
                    noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
                xa = project(xb + eps * noise, xb, eps, norm, clip)
                for _ in range(steps):
                    xa.requires_grad_(True)
                    logits = model(xa)
                    true = logits.gather(1, yb.view(-1, 1)).squeeze(1)
                    other = logits.clone()
                    other.scatter_(1, yb.view(-1, 1), -float("inf"))
                    loss = (other.max(1).values - true).sum()
                    (grad,) = torch.autograd.grad(loss, xa)
                    xa = ascent_step(xa, grad, xb, eps, norm, step_size, clip)
                    bar.advance(1)
                with torch.no_grad():
                    ok &= model(xa).argmax(1) == yb
            out.append(ok)
    finally:
        bar.close()
    return torch.cat(out)


def certify_bounds(model, x, y, eps, method="IBP", num_classes=10, norm=math.inf, clip=(0.0, 1.0),
                   batch_size=250, bounded=None):
    """(certified bool (B,), margin lower bound (B,)) for x (B, *input_shape), labels y (B,).

    Validated first (ValueError, nothing computed): eps a finite real >= 0; x finite, of the
    model's dtype / device, inside ``clip``; y integers of shape (B,) in [0, num_classes); the
    model's logits (B, num_classes); no NaN / inf weights; method one of 'IBP', 'CROWN'
    (intersected with IBP), 'CROWN-IBP', 'CROWN-Optimized' (any case). ``bounded``: a
    BoundedModule of ``model`` to reuse (built with ``make_bounded`` otherwise)."""
    eps, method, norm, clip = check_eps(eps), check_method(method, BOUND_METHODS), check_norm(norm), check_clip(clip)
    num_classes, batch_size = check_num_classes(num_classes), check_positive_int("batch_size", batch_size)
    model.eval()
    check_finite_params(model)
    x = check_x(x, model, clip)
    check_logits(model, x[:1], num_classes)
    y = check_labels(y, len(x), num_classes, x.device)
    bounded = bounded if bounded is not None else make_bounded(model, x[:1])
    bounded.eval()
    margins = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        grad = method == "CROWN-Optimized"  # alpha-CROWN optimises with autograd
        with torch.set_grad_enabled(grad):
            lb = _margin_lower_bounds(bounded, xb, yb, eps, method, num_classes, norm, clip)
        margins.append(lb.detach().min(1).values)
    margin = torch.cat(margins)
    return margin > 0, margin
