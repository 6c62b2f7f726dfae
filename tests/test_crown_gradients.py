"""Exact gradients of CROWN bounds through a DEQ (crown_gradient='exact'): the adjoint vector
differentiated as the iterate it is (implicitly at a converged fixed point, unrolled otherwise) and
the box with the implicit gradient of the interval fixed point; checked against central finite
differences, which the constant-nu gradient ('fixed') misses."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

from lirpa_deq.bounds.adjoint import (ReLUAffineRelaxation, best_adjoint_bound, bound_at, exact_adjoint,
                                      relu_relaxation)
from lirpa_deq.nn import DEQ, IBPMonLinear
from lirpa_deq.nn.cells.base import MatrixOperator

# the proved box must sit at the interval fixed point (to rounding) for finite differences to see
# the implicit gradient: a tight search and many tightening steps
TIGHT = {"tol": 1e-13, "max_iter": 500, "tighten_steps": 60, "adjoint_tol": 1e-14, "adjoint_max_iter": 500}


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16),
                         DEQ(IBPMonLinear(16), solver="fixed_point_iter", tol=1e-12, max_iter=2000),
                         nn.Linear(16, 5)).double()


def _directional(bm, bx, param, weights, direction, method, h=1e-6):
    vals = []
    for sign in (1, -1):
        with torch.no_grad():
            param.add_(sign * h * direction)
            lb, _ = bm.compute_bounds(x=(bx,), method=method)
            param.sub_(sign * h * direction)
        vals.append(float((lb * weights).sum()))
    return (vals[0] - vals[1]) / (2 * h)


@pytest.mark.parametrize("eps,method", [(0.01, "CROWN"), (0.05, "CROWN-IBP")])
def test_crown_gradient_matches_finite_differences(eps, method):
    model = _model(6)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    errors = {}
    for mode in ("exact", "fixed"):
        bm = BoundedModule(model, x, bound_opts={"deq": {**TIGHT, "crown_gradient": mode}})
        params = dict(bm.named_parameters())
        names = [n for n in params if n.endswith("cell.M")] + [n for n in params if n.startswith("1.") and "weight" in n]
        lb, _ = bm.compute_bounds(x=(bx,), method=method)
        gen = torch.Generator().manual_seed(1)
        weights = torch.randn(lb.shape, dtype=torch.float64, generator=gen)
        grads = torch.autograd.grad((lb * weights).sum(), [params[n] for n in names])
        for name, grad in zip(names, grads):
            direction = torch.randn(grad.shape, dtype=torch.float64, generator=gen)
            fd = _directional(bm, bx, params[name], weights, direction, method)
            errors[mode, name] = abs(float((grad * direction).sum()) - fd) / abs(fd)
    exact = [v for (mode, _), v in errors.items() if mode == "exact"]
    fixed = [v for (mode, _), v in errors.items() if mode == "fixed"]
    assert max(exact) < 1e-4, errors
    assert max(fixed) > 1e-2, errors  # the constant-nu, constant-box gradient is measurably off


def test_exact_adjoint_gradient_in_weights_spec_and_slopes():
    """The adjoint iterate's gradient in W, g and the optimizable slopes, for an iterate that is NOT
    the fixed point (an earlier iterate wins here), against finite differences."""
    gen = torch.Generator().manual_seed(0)
    n, B, S = 8, 2, 3
    rand = lambda *s: torch.rand(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    W0 = (rand(n, n) * 2 - 1) * 0.3
    box = (rand(B, n) * 0.2, rand(B, n) * 0.2 + 1)
    l = rand(B, n) * 2 - 1.3
    h = l + rand(B, n) * 2
    uc = rand(B, n) * 2 - 1
    g0, alpha0 = rand(S, B, n) * 2 - 1, rand(S, B, n)
    picks = []

    def bound(W, g, alpha):
        rel = ReLUAffineRelaxation(MatrixOperator(W), relu_relaxation(l, h)).with_lower_slopes(alpha)
        record = {}
        _, _, _, nu = best_adjoint_bound(g.detach(), rel, box, (uc, uc), max_iter=2000, tol=1e-15, record=record)
        picks.append(bool((record["pick"] == record["last"]).all()))
        A, bias = bound_at(exact_adjoint(nu, g, rel, record, max_iter=2000, tol=1e-15), g, rel, box)
        return (bias + (A * uc).sum(-1)).sum()

    for index in range(3):
        args = [W0.clone().requires_grad_(), g0.clone().requires_grad_(), alpha0.clone().requires_grad_()]
        (grad,) = torch.autograd.grad(bound(*args), [args[index]])
        direction = torch.randn(grad.shape, dtype=torch.float64, generator=gen)
        plus = [a.detach().clone() for a in args]
        minus = [a.detach().clone() for a in args]
        plus[index] += 1e-6 * direction
        minus[index] -= 1e-6 * direction
        fd = (float(bound(*plus)) - float(bound(*minus))) / 2e-6
        assert abs(float((grad * direction).sum()) - fd) <= 1e-6 * (1 + abs(fd)), (index, fd)
    assert not all(picks)  # the unrolled branch was exercised
