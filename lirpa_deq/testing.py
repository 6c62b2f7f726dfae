"""Empirical soundness checks: do certified bounds contain what real inputs produce?

A certified lower/upper bound must contain f(x') for EVERY x' in the perturbation ball. These helpers
search for counter-examples three ways -- random points of the ball, its vertices (l_inf corners),
and PGD attacks that push each output towards and beyond each bound -- and report violations.
They can only find unsoundness, never prove soundness; the test suite uses them on every bound
method, and users can run them on their own models.

Shapes: ``x`` is a batch (B, *input_shape); ``f(x)`` returns (B, K) (already multiplied by a
specification matrix if one is used); ``lb``/``ub`` are (B, K) (either may be None).
"""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class SoundnessReport:
    """Outcome of a counter-example search. ``violations`` counts (point, output) pairs outside the
    bounds by more than ``atol``; ``worst`` is the largest excess found (<= 0 when sound)."""

    violations: int
    worst: float
    points: int

    def __str__(self):
        return f"{self.violations} violations over {self.points} points (worst excess {self.worst:.3e})"


def ball_samples(x, eps, n, norm=math.inf, generator=None, vertices=True):
    """Points of the ball {x' : ||x' - x||_norm <= eps} around each row of ``x``.

    Returns a tensor (n, B, *input_shape): random interior points, and for l_inf also random
    vertices (every coordinate at +-eps) when ``vertices`` (the extremes of piecewise-linear nets
    often sit there). For l2 the points are uniform on the sphere scaled by U^(1/d)."""
    shape = (n, *x.shape)
    kw = dict(device=x.device, dtype=x.dtype, generator=generator)
    if norm == math.inf:
        delta = (torch.rand(shape, **kw) * 2 - 1) * eps
        if vertices:
            half = n // 2
            signs = torch.randint(0, 2, (half, *x.shape), device=x.device, generator=generator)
            delta[:half] = (signs.to(x.dtype) * 2 - 1) * eps
    elif norm == 2:
        d = x[0].numel()
        direction = torch.randn(shape, **kw)
        direction = direction / direction.flatten(2).norm(dim=2).view(n, x.shape[0], *[1] * (x.dim() - 1))
        radius = torch.rand((n, x.shape[0]), **kw) ** (1.0 / d) * eps
        delta = direction * radius.view(n, x.shape[0], *[1] * (x.dim() - 1))
    else:
        raise ValueError(f"norm must be math.inf or 2, got {norm!r}")
    return x.unsqueeze(0) + delta


def project(x_adv, x, eps, norm, clip=None):
    """Projection of ``x_adv`` onto the eps-ball around ``x`` (per row; l_inf or l2), then
    optionally onto the box ``clip = (low, high)`` (e.g. the valid pixel range)."""
    if norm == math.inf:
        x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
    else:
        delta = x_adv - x
        flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        x_adv = x + delta * torch.clamp(eps / flat, max=1.0).view(-1, *[1] * (x.dim() - 1))
    return x_adv.clamp(*clip) if clip is not None else x_adv


def ascent_step(x_adv, grad, x, eps, norm, step_size, clip=None):
    """One projected steepest-ascent step for the norm (sign of the gradient for l_inf, the
    normalised gradient for l2), back into the eps-ball around ``x``. No graph is recorded."""
    with torch.no_grad():
        if norm == math.inf:
            direction = grad.sign()
        else:
            direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        return project(x_adv + step_size * direction, x, eps, norm, clip)


def pgd_extremes(f, x, eps, steps=30, restarts=1, norm=math.inf, step_size=None, generator=None):
    """Projected gradient search for the smallest and largest value of every output of ``f``.

    Returns (points_min, points_max), each (restarts, K, B, *input_shape): for output k the point
    that minimises (resp. maximises) f(.)[:, k]. Every output gets its own attack, since a point
    that breaks one bound rarely breaks another."""
    with torch.no_grad():
        k = f(x).shape[1]
    step_size = step_size if step_size is not None else 2.5 * eps / steps
    results = []
    for sign in (-1.0, 1.0):
        per_restart = []
        for _ in range(restarts):
            # one batched attack over all K outputs: replicate the batch K times
            xk = x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
            start = ball_samples(xk, eps, 1, norm=norm, generator=generator, vertices=False)[0]
            x_adv = start.detach().requires_grad_(True)
            pick = torch.arange(k, device=x.device).repeat_interleave(x.shape[0])
            for _ in range(steps):
                out = f(x_adv)
                objective = sign * out.gather(1, pick.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(objective, x_adv)
                x_adv = ascent_step(x_adv, grad, xk, eps, norm, step_size).requires_grad_(True)
            per_restart.append(x_adv.detach().view(k, *x.shape))
        results.append(torch.stack(per_restart))
    return results[0], results[1]


def count_violations(outputs, lb, ub, atol=1e-5, rtol=0.0):
    """Violations of lb <= outputs <= ub, with outputs (..., B, K) and lb, ub (B, K) or None."""
    worst = -math.inf
    violations = 0
    for bound, excess_fn in ((lb, lambda b: b - outputs), (ub, lambda b: outputs - b)):
        if bound is None:
            continue
        excess = excess_fn(bound)
        tol = atol + rtol * bound.abs()
        violations += int((excess > tol).sum())
        worst = max(worst, float(excess.detach().max()))
    return violations, worst


def check_bounds(f, x, eps, lb, ub, norm=math.inf, n_samples=256, pgd_steps=30, pgd_restarts=1,
                 atol=1e-5, rtol=0.0, seed=0):
    """Search for counter-examples to ``lb <= f(x') <= ub`` over the eps-ball; returns a
    SoundnessReport. ``f`` maps (N, *input_shape) -> (N, K) and must be differentiable for PGD."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with torch.no_grad():
        pts = ball_samples(x, eps, n_samples, norm=norm, generator=generator)
        outs = f(pts.reshape(-1, *x.shape[1:])).reshape(n_samples, x.shape[0], -1)
        outs = torch.cat([outs, f(x).unsqueeze(0)])
    v, worst = count_violations(outs, lb, ub, atol, rtol)
    total = n_samples + 1
    if pgd_steps > 0 and eps > 0:
        lo_pts, hi_pts = pgd_extremes(f, x, eps, steps=pgd_steps, restarts=pgd_restarts, norm=norm,
                                      generator=generator)
        with torch.no_grad():
            for pts_k in (lo_pts, hi_pts):
                r, k = pts_k.shape[:2]
                outs = f(pts_k.reshape(-1, *x.shape[1:])).reshape(r * k, x.shape[0], -1)
                v2, w2 = count_violations(outs, lb, ub, atol, rtol)
                v, worst, total = v + v2, max(worst, w2), total + r * k
    return SoundnessReport(violations=v, worst=worst, points=total * x.shape[0])


def assert_sound(f, x, eps, lb, ub, **kwargs):
    """``check_bounds`` that raises AssertionError with the report when a violation is found."""
    report = check_bounds(f, x, eps, lb, ub, **kwargs)
    assert report.violations == 0, f"UNSOUND bounds: {report}"
    return report
