"""Picard containment (lirpa_deq.bounds.generic.picard): what it proves, when it applies, refusals."""
import math

import pytest
import torch
import torch.nn as nn

import lirpa_deq
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.nn import DEQ, serial_warm_start

N = 12


class ScaledCell(nn.Module):
    """act(W z + U x) with W = D A D^-1: ||W||_2 > 1 (no l2 contraction) but rho(|W|) = 0.6."""

    def __init__(self, act=torch.tanh, spread=1.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W, self.U, self.act = nn.Linear(N, N), nn.Linear(4, N), act
        A = torch.randn(N, N, generator=g)
        A = A * 0.6 / torch.linalg.eigvals(A.abs()).abs().max()
        d = torch.exp(torch.linspace(-spread, spread, N))
        with torch.no_grad():
            self.W.weight.copy_(d[:, None] * A / d[None, :])

    def forward(self, z, x):
        return self.act(self.W(z) + self.U(x))

    def state_shape(self, x_shape):
        return (x_shape[0], N)


def _model(solver="fixed_point_iter", **kw):
    torch.manual_seed(0)
    deq = DEQ(ScaledCell(), solver=solver, max_iter=400, tol=1e-10, **kw)
    return nn.Sequential(nn.Linear(3, 4), deq, nn.Linear(N, 2)).double().eval()


def _bounds(bounded, x, method="IBP", eps=0.05):
    return bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),), method=method)


def test_box_info_states_the_picard_guarantee_and_the_invariant_box():
    model = _model()
    x = torch.randn(3, 3, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    _bounds(bounded, x)
    (node,) = lirpa_deq.deq_nodes(bounded)
    info = node.box_info
    assert info["guarantee"] == "picard-limit" and info["box"] == "picard-invariant"
    assert "Lipschitz bound" in info["contraction_error"] and info["damping"] == 1.0
    lo, hi = node.box
    inv_lo, inv_hi = info["invariant_box"]
    assert bool((inv_lo <= 0).all() and (inv_hi >= 0).all())  # the invariant box holds the start z0 = 0
    assert bool((inv_lo <= lo).all() and (hi <= inv_hi).all())  # refinements stay inside it
    # every Picard iterate from zeros, for inputs of the region, stays in the invariant box
    cell, u = model[1].cell, model[0](x + 0.05 * (2 * torch.rand(64, *x.shape, dtype=x.dtype) - 1)).reshape(-1, 4)
    z = torch.zeros(u.shape[0], N, dtype=x.dtype)
    rep = lambda t: t.repeat(64, 1)  # noqa: E731
    for _ in range(60):
        z = cell(z, u)
        assert bool((rep(inv_lo) - 1e-9 <= z).all() and (z <= rep(inv_hi) + 1e-9).all())


@pytest.mark.parametrize("solver", ["fixed_point_iter", "anderson"])
def test_contractive_cells_keep_the_unique_fixed_point_guarantee(solver):
    torch.manual_seed(0)
    cell = ScaledCell(spread=0.0)  # D = I: ||W||_2 = ||A||_2, a contraction for this seed
    model = nn.Sequential(nn.Linear(3, 4), DEQ(cell, solver=solver), nn.Linear(N, 2)).double().eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    _bounds(bounded, x)
    info = lirpa_deq.deq_nodes(bounded)[0].box_info
    assert info["guarantee"] == "unique-fixed-point" and info["lipschitz"] < 1


@pytest.mark.parametrize("kw,match", [
    (dict(solver="anderson"), r"solver='fixed_point_iter'"),
    (dict(solver="broyden"), r"not a proved contraction"),
])
def test_other_solvers_are_refused_with_the_paths(kw, match):
    model = _model(**kw)
    x = torch.randn(2, 3, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    with pytest.raises(lirpa_deq.ContractionError, match=match) as err:
        _bounds(bounded, x)
    assert "lirpa_deq.convert" in str(err.value) and "docs/existing_deq.md" in str(err.value)


def test_no_invariant_box_is_refused_with_the_paths():
    torch.manual_seed(0)
    cell = ScaledCell(act=torch.relu)
    with torch.no_grad():
        cell.W.weight.mul_(3.0)  # rho(|W|) = 1.8: the interval map expands
    model = nn.Sequential(nn.Linear(3, 4), DEQ(cell, solver="fixed_point_iter", on_nonconvergence="ignore"),
                          nn.Linear(N, 2)).double().eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    with pytest.raises(lirpa_deq.ContractionError, match="nor an invariant box") as err:
        _bounds(bounded, x)
    assert "lirpa_deq.convert" in str(err.value)


def test_serial_warm_start_is_refused():
    model = _model()
    x = torch.randn(2, 3, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    with serial_warm_start(model, max_iter=5):
        with pytest.raises(lirpa_deq.ContractionError, match="serial_warm_start"):
            _bounds(bounded, x)
