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

# The public surface listed in docs/api.md; the ground-truth and judging helpers below (GroundTruth,
# truth_outputs, judge_bounds, judge_error, ...) are documented in docs/soundness.md.
__all__ = ["SoundnessReport", "ball_samples", "project", "ascent_step", "pgd_extremes", "count_violations",
           "check_bounds", "assert_sound"]


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


# ============================================================================ ground truth
# The checks above evaluate ``f`` as given. To test a DEQ's bounds, ``f`` must compute the TRUE
# fixed points, not the model's own (possibly truncated) solve: ``GroundTruth`` re-solves every DEQ
# layer of a float64 copy of the model with iterations of its own (no lirpa_deq solver), verifies
# each fixed point's residual, and reports the points where it was not reached.

RESOLVE_TOL = 1e-8  # accepted relative residual max|cell(z, u) - z| / (1 + max|z|) of a re-solve


def relative_residual(fz, z):
    """Per-sample ``max|fz - z| / (1 + max|z|)`` for states (N, *state); returns (N,)."""
    return (fz - z).flatten(1).abs().amax(1) / (1 + z.flatten(1).abs().amax(1))


def _relu_affine_fixed_point(cell, u, tol, rounds=40, dr_steps=25):
    """z = relu(W z + u) for a ReLU-affine cell in float64, u (N, *state) -> (z, residual (N,), W).

    Semismooth Newton (solve (I - D W0) y = D q for the active set D of the current y; exact once
    D is right) in the cell's monotone coordinates y = S z (W0 = S W S^-1, q = S u; S = I without
    a similarity), then, for samples still above tol, rounds of Douglas-Rachford on
    0 in (I - W0) y - q + N_{y >= 0}(y), which converges for every cell with sym(I - W0) >= m I
    (all ReLU-affine cells), each followed by a Newton step. A candidate is kept per sample only
    where it lowers the residual, which the cell's own forward measures in z coordinates."""
    op = cell.operator()
    shape, n = tuple(u.shape[1:]), u[0].numel()
    W = op.W(torch.eye(n, dtype=u.dtype).view(n, *shape)).reshape(n, n).T  # W[:, j] = W e_j
    s = torch.ones(n, dtype=u.dtype)
    if op.similarity is not None:
        s = op.similarity.to(u.dtype).expand(1, *shape).reshape(n)
    W0, q = s[:, None] * W / s[None, :], u.flatten(1) * s
    eye = torch.eye(n, dtype=u.dtype)

    def resid(y):
        z = (y / s).view(-1, *shape)
        r = relative_residual(cell(z, u), z)
        return torch.where(torch.isfinite(r), r, torch.full_like(r, math.inf))

    def newton(y):
        D = ((y @ W0.T + q) > 0).to(u.dtype)
        y_new, info = torch.linalg.solve_ex(eye - D[:, :, None] * W0, D * q)
        return torch.where((info == 0)[:, None], y_new, y)

    best = torch.relu(q)
    best_r = resid(best)

    def keep(c):
        nonlocal best, best_r
        r = resid(c)
        better = r < best_r
        best, best_r = torch.where(better[:, None], c, best), torch.minimum(r, best_r)
        return bool((best_r <= tol * 1e-4).all())

    y = best
    for _ in range(8):
        y = newton(y)
        if keep(y):
            return (best / s).view(-1, *shape), best_r, W
    R = torch.linalg.inv(eye + (eye - W0)).T  # resolvent of A with step 1, applied to rows
    v = q.clone()
    for _ in range(rounds):
        for _ in range(dr_steps):
            y = torch.relu(v)
            v = v + (2 * y - v + q) @ R - y
        y = torch.relu(v)
        if keep(y) or keep(newton(y)):
            break
    return (best / s).view(-1, *shape), best_r, W


class _ReLUAffineFixedPoint(torch.autograd.Function):
    """z*(u) with the exact gradient d z* / d u = (I - D W)^-1 D, D = [W z* + u > 0] (for PGD)."""

    @staticmethod
    def forward(ctx, u, cell, tol, log):
        z, r, W = _relu_affine_fixed_point(cell, u, tol)
        log.append(r)
        ctx.save_for_backward(((z.flatten(1) @ W.T + u.flatten(1)) > 0).to(u.dtype), W)
        return z

    @staticmethod
    def backward(ctx, g):
        D, W = ctx.saved_tensors
        A = torch.eye(W.shape[0], dtype=W.dtype) - W.T.unsqueeze(0) * D.unsqueeze(1)  # I - W^T D
        h = torch.linalg.solve_ex(A, g.flatten(1))[0]
        return (D * h).view(g.shape), None, None, None


def _generic_fixed_point(cell, x, tol, max_iter=6000, unroll=0):
    """z = cell(z, x) by plain (Banach) iteration from zeros (the generic cells are contractions)
    until every sample is 1e-4 tol below ``tol``; then ``unroll`` differentiable steps (an
    approximate gradient for PGD). Returns (z (N, *state), residual (N,))."""
    shape = tuple(cell.state_shape(x.shape)) if hasattr(cell, "state_shape") else tuple(x.shape)
    z = torch.zeros(shape, dtype=x.dtype)
    with torch.no_grad():
        for i in range(max_iter):
            fz = cell(z, x)
            done = (i % 20 == 0) and bool((relative_residual(fz, z) <= tol * 1e-4).all())
            z = fz
            if done:
                break
        residual = relative_residual(cell(z, x), z)
    for _ in range(unroll):
        z = cell(z, x)
    return z, residual


def float64_copy(model):
    """A deep float64 copy of ``model`` with parameters that do not require gradients."""
    import copy
    twin = copy.deepcopy(model).double()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class GroundTruth:
    """The model's outputs with every DEQ layer re-solved independently in float64.

    ``GroundTruth(model, spec=None, tol=RESOLVE_TOL)`` copies the model (its state at this time);
    only each cell's forward (and a ReLU-affine cell's operator W and declared similarity) is
    used. ``gt(xs) -> (y, valid, residual)``: xs (N, *input_shape), row i belonging to sample
    ``i % B`` of a batch of B (the layout of ``ball_samples(...).reshape(-1, ...)``); y (N, K)
    float64, times ``spec`` (B, S, K) if given, then (N, S); ``valid`` (N,) is False where a
    DEQ's re-solve missed ``tol`` (such rows must be discarded); ``residual`` the worst one.
    ``gt.differentiable(xs)``: y only, with gradients w.r.t. xs (exact for ReLU-affine cells,
    through 30 unrolled steps for generic ones): the model PGD attacks."""

    def __init__(self, model, spec=None, tol=RESOLVE_TOL, max_iter=6000):
        from .nn import DEQ
        self.model, self.tol, self.max_iter = float64_copy(model), tol, max_iter  # max_iter: generic cells
        self.spec = None if spec is None else spec.detach().double()
        self._log, self._grad = [], False
        for m in self.model.modules():
            if isinstance(m, DEQ):
                m.forward = self._patched(m)

    def _patched(self, deq):
        from .nn.cells.base import ReLUAffineCell

        def forward(u, z0=None):
            if isinstance(deq.cell, ReLUAffineCell):
                return _ReLUAffineFixedPoint.apply(u, deq.cell, self.tol, self._log)
            z, r = (_generic_fixed_point(deq.cell, u, 1e-2, unroll=30) if self._grad  # PGD: approximate
                    else _generic_fixed_point(deq.cell, u, self.tol, self.max_iter))
            self._log.append(r)
            return z
        return forward

    def _outputs(self, xs):
        y = self.model(xs.double())
        return y if self.spec is None else apply_spec(self.spec, y)

    def differentiable(self, xs):
        self._grad = True
        try:
            return self._outputs(xs)
        finally:
            self._grad = False

    def __call__(self, xs):
        self._log = []
        with torch.no_grad():
            y = self._outputs(xs)
        residual = torch.zeros(xs.shape[0], dtype=torch.float64)
        for r in self._log:
            residual = torch.maximum(residual, torch.nan_to_num(r, nan=math.inf))
        valid = (residual <= self.tol) & torch.isfinite(y).all(1)
        return y, valid, residual


def apply_spec(spec, y):
    """``spec`` (B, S, K) applied to outputs y (N, K) whose row i belongs to sample i % B."""
    return torch.einsum("nsk,nk->ns", spec.repeat(y.shape[0] // spec.shape[0], 1, 1), y)


def truth_outputs(model, x, eps, norm=math.inf, spec=None, n_samples=48, pgd_steps=12, seed=0):
    """Ground-truth outputs at points of the eps-ball around x (B, *input_shape): ``n_samples``
    random points (half of them vertices for l_inf), the centre, and for eps > 0 the end points
    of a PGD attack per output and direction on ``GroundTruth.differentiable``.

    Returns (y (P, B, K), valid (P, B), worst re-solve residual); K = S with a spec."""
    generator = torch.Generator().manual_seed(seed)
    x64, gt = x.detach().double(), GroundTruth(model, spec=spec)
    pts = [ball_samples(x64, eps, n_samples, norm=norm, generator=generator), x64.unsqueeze(0)]
    if pgd_steps > 0 and eps > 0:
        for p in pgd_extremes(gt.differentiable, x64, eps, steps=pgd_steps, norm=norm, generator=generator):
            pts.append(p.reshape(-1, *x64.shape))
    pts = torch.cat(pts)
    y, valid, res = gt(pts.reshape(-1, *x64.shape[1:]))
    b = x64.shape[0]
    return y.view(pts.shape[0], b, -1), valid.view(pts.shape[0], b), float(res.max())


# ============================================================================ judging one bound
FAILING = ("violated", "non-finite", "crossed", "crash", "number-for-bad-input")
CLEAR_ERRORS = ("IntervalProofError", "ContractionError", "ValueError", "TypeError", "NotImplementedError")


@dataclasses.dataclass
class Verdict:
    """How one ``compute_bounds`` call fared. ``status``: 'sound' | 'refused' (a clear error) |
    'undetermined' (no verified ground-truth point) or one of ``FAILING``; ``detail``: the error or
    where it went wrong; ``worst``: largest excess (bound - truth) over the points, divided by
    the output scale 1 + max|y| (<= 0 when sound); ``points`` / ``discarded``: ground-truth points
    used / dropped because their re-solve missed RESOLVE_TOL."""

    status: str
    detail: str = ""
    worst: float = -math.inf
    points: int = 0
    discarded: int = 0

    @property
    def failed(self):
        return self.status in FAILING


def judge_error(exc):
    """A raised exception: 'refused' if it is one of the project's clear errors (a type in
    ``CLEAR_ERRORS``, its class or a base class, with a non-empty message), else 'crash'."""
    names = {c.__name__ for c in type(exc).__mro__}
    ok = bool(names & set(CLEAR_ERRORS)) and bool(str(exc).strip())
    return Verdict("refused" if ok else "crash", f"{type(exc).__name__}: {str(exc)[:160]}")


def judge_bounds(lb, ub, y, valid, rtol):
    """Bounds lb, ub (B, K) against ground-truth outputs y (P, B, K) with ``valid`` (P, B).
    Non-finite bounds and lb > ub (beyond the tolerance) fail before any point is looked at; the
    tolerance is ``rtol * (1 + max|y|)``, rtol ~1e-6 for float64 models and 1e-4 for float32."""
    lb, ub = lb.detach().double(), ub.detach().double()
    if not (bool(torch.isfinite(lb).all()) and bool(torch.isfinite(ub).all())):
        bad = int((~torch.isfinite(lb)).sum() + (~torch.isfinite(ub)).sum())
        return Verdict("non-finite", f"{bad} non-finite bound entries")
    yv = y[valid]  # (V, K)
    scale = 1.0 + (float(yv.abs().max()) if yv.numel() else float(torch.maximum(lb.abs(), ub.abs()).max()))
    tol = rtol * scale
    crossed = float((lb - ub).max())
    if crossed > tol:
        return Verdict("crossed", f"lb > ub by {crossed:.3e}", crossed / scale)
    discarded = int((~valid).sum())
    if yv.numel() == 0:
        return Verdict("undetermined", "no verified ground-truth point", discarded=discarded)
    m = valid.unsqueeze(-1)
    excess = torch.maximum(lb.unsqueeze(0) - y, y - ub.unsqueeze(0)).masked_fill(~m, -math.inf)
    worst = float(excess.max())
    status = "violated" if worst > tol else "sound"
    n_bad = int((excess > tol).sum())
    return Verdict(status, f"{n_bad} entries outside by up to {worst:.3e}" if n_bad else "",
                   worst / scale, int(valid.sum()), discarded)
