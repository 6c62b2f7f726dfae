"""Jacobian bounds through a DEQ with upstream auto_LiRPA's Jacobian API (``JacobianOP`` +
``compute_jacobian_bounds``; the DEQ's gradient node is lirpa_deq.bounds.jacobian): the bounds
contain the true Jacobian at sampled points and l_inf vertices of the ball, the local Lipschitz
constant they imply is above the empirical one (samples + gradient ascent), and compares with
lirpa_deq.lipschitz on the same models. auto_LiRPA 0.3 has no Jacobian API: skipped there."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

from lirpa_deq import IntervalProofError
from lirpa_deq.lipschitz import local_lipschitz
from lirpa_deq.lipschitz.empirical import empirical_lipschitz
from lirpa_deq.nn import DEQ, IBPMonLinear, MonLinear, TanhCell
from lirpa_deq.testing import ball_samples

pytestmark = pytest.mark.skipif(not hasattr(BoundedModule, "compute_jacobian_bounds"),
                                reason="this auto_LiRPA has no Jacobian bounds API (compute_jacobian_bounds, "
                                       "JacobianOP: upstream >= 0.5)")
ATOL = 1e-9  # true Jacobians come from DEQ solves at tol 1e-11 (float64)


class JacobianOf(nn.Module):
    """Upstream's way to ask for d model / d x: the output of the graph is the Jacobian."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        from auto_LiRPA.bound_ops import JacobianOP

        return JacobianOP.apply(self.model(x), x)


def _model(seed, cell="ibp-mon", relu_front=True, scale=1.0, max_iter=500):
    torch.manual_seed(seed)
    hidden = 10
    cells = {"ibp-mon": lambda: IBPMonLinear(hidden), "mon": lambda: MonLinear(hidden),
             "tanh": lambda: TanhCell(hidden, hidden)}
    front = [nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, hidden)] if relu_front else [nn.Linear(6, hidden)]
    model = nn.Sequential(*front, DEQ(cells[cell](), tol=1e-11, max_iter=max_iter), nn.Linear(hidden, 3)).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    return model


def true_jacobian(model, x):
    """(B, K, n) autograd Jacobian of the model at each row of x."""
    rows = [torch.autograd.functional.jacobian(lambda z: model(z).sum(0), x[i:i + 1])[:, 0] for i in range(len(x))]
    return torch.stack(rows)


def jacobian_bounds(model, x, eps, optimize=False):
    bounded = BoundedModule(JacobianOf(model), x)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    lb, ub = bounded.compute_jacobian_bounds(bx, optimize=optimize)
    return bounded, lb.detach(), ub.detach()


def assert_contains(model, x, eps, lb, ub, n=24):
    points = ball_samples(x, eps, n, generator=torch.Generator().manual_seed(1))  # interior + vertices
    worst = 0.0
    for p in torch.cat([x.unsqueeze(0), points]):
        J = true_jacobian(model, p)
        worst = max(worst, float((lb - J).max()), float((J - ub).max()))
    assert worst <= ATOL, f"Jacobian outside its bounds by {worst:.3g}"


CASES = [  # (seed, eps, model kwargs, tight: the adjoint enclosure is proved, no fallback)
    (0, 0.05, {}, True), (1, 0.2, {}, True),               # some / many unstable neurons
    (3, 0.05, {"scale": 3.0}, True),                        # adversarially scaled weights
    # a MonDEQ cell: rho(Dbar |W|^T) < 1 is not provable, the global ||J||_2 <= 1/m bound is used
    (2, 0.1, {"relu_front": False, "cell": "mon"}, False),
]


@pytest.mark.filterwarnings("ignore::lirpa_deq.lipschitz.LipschitzFallbackWarning")  # the MonDEQ case
@pytest.mark.parametrize("seed,eps,kw,tight", CASES)
def test_jacobian_bounds_through_a_deq_are_sound(seed, eps, kw, tight):
    model, x = _model(seed, **kw), torch.rand(1, 6, dtype=torch.float64)
    try:
        bounded, lb, ub = jacobian_bounds(model, x, eps)
    except IntervalProofError:
        pytest.fail("no proof on a case chosen to have one")  # a refusal would also be sound, not here
    assert lb.shape == (1, 3, 6) and bool(torch.isfinite(lb).all() & torch.isfinite(ub).all())
    if tight:  # informative, not vacuous
        assert float((ub - lb).max()) < 10 * float(true_jacobian(model, x).abs().max())
    assert torch.allclose(bounded(x), true_jacobian(model, x), atol=1e-8)  # the graph's own value at x
    assert_contains(model, x, eps, lb, ub)
    lipschitz = torch.maximum(lb.abs(), ub.abs()).sum(-1)  # l_inf ball: l1 norm of each gradient row
    C = torch.eye(3, dtype=x.dtype).unsqueeze(0)
    empirical = empirical_lipschitz(model, x, eps, C, math.inf, n_samples=16, steps=8, restarts=1)
    assert bool((lipschitz >= empirical - ATOL).all())
    assert bool((local_lipschitz(model, x, eps, math.inf, "local", C) >= empirical - ATOL).all())


def test_jacobian_bounds_with_alpha_optimization_and_a_non_converged_forward():
    """compute_jacobian_bounds' default (alpha-CROWN first): still sound; the bounds never use the
    forward solve's iterate (a 2-iteration forward gives the same bounds as a converged one)."""
    model, x = _model(4), torch.rand(1, 6, dtype=torch.float64)
    _, lb, ub = jacobian_bounds(model, x, 0.1, optimize=True)
    assert_contains(model, x, 0.1, lb, ub, n=12)
    rough = _model(4, max_iter=2)
    with pytest.warns(Warning):
        _, lb2, ub2 = jacobian_bounds(rough, x, 0.1)
    _, lb3, ub3 = jacobian_bounds(model, x, 0.1)
    assert torch.allclose(lb2, lb3, rtol=0, atol=1e-12) and torch.allclose(ub2, ub3, rtol=0, atol=1e-12)


def test_generic_cells_are_refused_with_a_reason():
    model, x = _model(5, cell="tanh"), torch.rand(1, 6, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="ReLU-affine cell .*TanhCell is a generic cell"):
        jacobian_bounds(model, x, 0.05)
