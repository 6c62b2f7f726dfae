"""The monotone-ball box: the proved fallback for cells whose interval system does not converge
(MonDEQ, orthogonal). IBP and CROWN through such cells stay sound, including adversarially
scaled weights; the interval proof itself refuses them."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

from lirpa_deq.bounds import IntervalProofError
from lirpa_deq.bounds.ball_box import monotone_ball_box
from lirpa_deq.nn import DEQ, MonConv2d, MonLinear, OrthoConv2d, OrthoLinear
from lirpa_deq.testing import assert_sound

ATOL = 1e-7  # the model's outputs come from float64 solves at tol 1e-11


def _fc(cell_cls, scale, seed):
    torch.manual_seed(seed)
    cell = cell_cls(12)
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(scale)  # adversarially scaled raw weights: the guarantee must still hold
    deq = DEQ(cell, solver="peaceman_rachford", tol=1e-11, max_iter=5000)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, 12), deq, nn.Linear(12, 4)).double()


@pytest.mark.parametrize("cell_cls", [MonLinear, OrthoLinear])
@pytest.mark.parametrize("scale,seed", [(1.0, 0), (5.0, 1)])
@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_fallback_box_sound_fc(cell_cls, scale, seed, method):
    model = _fc(cell_cls, scale, seed)
    x = torch.rand(3, 1, 3, 3, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),), method=method)
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
    assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=200, pgd_steps=20)


@pytest.mark.parametrize("cell_cls", [MonConv2d, OrthoConv2d])
def test_fallback_box_sound_conv(cell_cls):
    torch.manual_seed(0)
    # contraction cells converge by plain iteration; MonConv: Anderson (fastest measured here)
    solver = "fixed_point_iter" if cell_cls is OrthoConv2d else "anderson"
    deq = DEQ(cell_cls(2), solver=solver, tol=1e-10, max_iter=20000)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), deq, nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.03)),), method="IBP")
    assert_sound(model, x, 0.03, lb, ub, atol=1e-6, n_samples=100, pgd_steps=8)


def test_interval_proof_refuses_and_fallback_can_be_disabled():
    model = _fc(MonLinear, 5.0, 1)
    x = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05))
    bounded = BoundedModule(model, x, bound_opts={"deq": {"fallback": False}})
    with pytest.raises(IntervalProofError, match="CROWN|IBPMon"):
        bounded.compute_bounds(x=(bx,), method="IBP")


def test_ball_box_contains_fixed_points_of_sampled_injections():
    torch.manual_seed(3)
    cell = MonLinear(10).double()
    op = cell.operator()
    u_c = torch.randn(4, 10, dtype=torch.float64)
    u_r = torch.rand(4, 10, dtype=torch.float64) * 0.2
    z_rough = torch.zeros_like(u_c)  # a deliberately bad centre: its error must be accounted for
    lo, hi = monotone_ball_box(op, cell.margin, u_c - u_r, u_c + u_r, z_rough)
    deq = DEQ(cell, solver="peaceman_rachford", tol=1e-12, max_iter=5000)
    for _ in range(50):
        u = u_c + (torch.rand_like(u_c) * 2 - 1) * u_r
        with torch.no_grad():
            z = deq(u)
        assert bool((z >= lo - 1e-9).all() and (z <= hi + 1e-9).all())
    # and the box is informative: narrower than the trivial magnitude bound
    assert float((hi - lo).max()) < 10 * float(u_c.abs().max() + u_r.max())
