"""Evaluation of (certifiably) trained models: clean accuracy, PGD accuracy, bound certificates.

Perturbation set everywhere: the l_norm ball of radius eps around x intersected with the data
domain ``clip`` (default [0, 1]), as in training (``losses.perturbation``).

* :func:`pgd_robust` -- PGD with a margin (CW) loss, random starts; returns which points
  resisted. PGD accuracy is an UPPER bound on any sound certified accuracy of the same model.
* :func:`certify_bounds` -- certified (B,) and the margin lower bound (B,) (min over j != y of a
  lower bound on f_y - f_j) from auto_LiRPA bounds ('IBP', 'CROWN' -- CROWN is intersected with
  IBP --, 'CROWN-Optimized'). A point is certified iff its margin lower bound is > 0; the
  guarantee is that of the bound (proved for the DEQ node: ``docs/crown.md``, ``docs/ibp.md``).
"""
from __future__ import annotations

import math

import torch

from ..testing import ascent_step, project
from .losses import make_bounded, margin_lower_bounds


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """argmax predictions (B,) of ``model`` on x (B, *input_shape), in batches."""
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def pgd_robust(model, x, y, eps, steps=20, restarts=1, norm=math.inf, clip=(0.0, 1.0), step_size=None,
               batch_size=500, seed=0) -> torch.Tensor:
    """Bool (B,): True where the model classifies x correctly AND no PGD attack (``restarts``
    random starts, ``steps`` steps of size ``step_size`` (default 2.5 eps / steps), loss = max_j
    f_j - f_y) found a misclassified point of the perturbation set."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        with torch.no_grad():
            ok = model(xb).argmax(1) == yb
        for _ in range(restarts if eps > 0 else 0):
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
            with torch.no_grad():
                ok &= model(xa).argmax(1) == yb
        out.append(ok)
    return torch.cat(out)


def certify_bounds(model, x, y, eps, method="IBP", num_classes=10, norm=math.inf, clip=(0.0, 1.0),
                   batch_size=250, bounded=None):
    """(certified bool (B,), margin lower bound (B,)) for x (B, *input_shape), labels y (B,).

    method: 'IBP', 'CROWN' (intersected with IBP) or 'CROWN-Optimized'. ``bounded``: a
    BoundedModule of ``model`` to reuse (built with ``make_bounded`` otherwise)."""
    model.eval()
    bounded = bounded if bounded is not None else make_bounded(model, x[:1])
    bounded.eval()
    margins = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        grad = method.upper() == "CROWN-OPTIMIZED"  # alpha-CROWN optimises with autograd
        with torch.set_grad_enabled(grad):
            lb = margin_lower_bounds(bounded, xb, yb, eps, method, num_classes, norm, clip)
        margins.append(lb.detach().min(1).values)
    margin = torch.cat(margins)
    return margin > 0, margin
