"""Adjoint-DEQ CROWN bounds through the fixed-point node: sound (sampled, vertex, PGD points) for any
adjoint iterate, and tighter than IBP on IBP-MonDEQ models."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear
from lirpa_deq.testing import assert_sound

# The bounds certify the TRUE fixed point; the model's outputs come from a solve at tol 1e-10 in
# float64, so atol 1e-7 covers the solver error while still catching a real violation.
ATOL = 1e-7


def fc_model(seed, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), DEQ(IBPMonLinear(hidden), solver="fixed_point_iter", tol=1e-10, max_iter=500),
                         nn.Linear(hidden, 5)).double()


def conv_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), DEQ(IBPMonConv2d(3), solver="fixed_point_iter", tol=1e-10, max_iter=500), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)).double()


def _bounds(model, x, eps, method, **deq_opts):
    bounded = BoundedModule(model, x, bound_opts={"deq": deq_opts} if deq_opts else None)
    return bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),), method=method)


@pytest.mark.parametrize("seed,eps,method", [(0, 0.003, "CROWN"), (1, 0.05, "CROWN"), (0, 0.3, "CROWN"),
                                             (1, 0.05, "CROWN-IBP"), (0, 0.05, "CROWN-Optimized")])
def test_crown_fc_sound(seed, eps, method):
    model = fc_model(seed)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    lb, ub = _bounds(model, x, eps, method)
    assert_sound(model, x, eps, lb, ub, atol=ATOL, n_samples=200, pgd_steps=25)


@pytest.mark.parametrize("method", ["CROWN"])
def test_crown_conv_sound(method):
    model = conv_model(0)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    lb, ub = _bounds(model, x, 0.05, method)
    assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)


@pytest.mark.parametrize("iters", [1, 2])
def test_sound_with_early_stopped_adjoint(iters):
    model = fc_model(3)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    lb, ub = _bounds(model, x, 0.05, "CROWN", adjoint_max_iter=iters)
    assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=200, pgd_steps=25)
    lb_full, ub_full = _bounds(model, x, 0.05, "CROWN")
    # the residual term loosens, never tightens beyond the converged adjoint (up to rounding)
    assert (ub - lb).mean() >= (ub_full - lb_full).mean() - 1e-9


def test_crown_tighter_than_ibp_on_ibp_mondeq():
    ratios = []
    for seed in range(3):
        model = fc_model(seed, hidden=24)
        x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
        ilb, iub = _bounds(model, x, 0.05, "IBP")
        clb, cub = _bounds(model, x, 0.05, "CROWN")
        # intersected with IBP never looser; on average strictly tighter
        width_c = (torch.minimum(cub, iub) - torch.maximum(clb, ilb)).mean()
        ratios.append(float(width_c / (iub - ilb).mean()))
    assert max(ratios) <= 1.0 + 1e-9
    assert sum(ratios) / len(ratios) < 0.8, ratios
