"""A user's solver registered with lirpa_deq.solvers.register_solver drives the DEQ's point solve and
the interval search of its bounds."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

import lirpa_deq  # noqa: F401
from lirpa_deq.nn import DEQ, IBPMonLinear
from lirpa_deq.solvers import SOLVERS, SolverStats, per_sample_residual, register_solver

CALLS = []


def picard_counting(f, z0, *, tol=1e-4, max_iter=50, tag="user"):
    """Plain Picard iteration that records each call (a stand-in for a user's own solver)."""
    CALLS.append((tag, tuple(z0.shape)))
    z = z0
    for k in range(max_iter):
        fz = f(z)
        res = per_sample_residual(z, fz)
        z = fz
        if float(res.max()) <= tol:
            break
    res = per_sample_residual(z, f(z))
    return z, SolverStats(k + 1, float(res.max()), bool((res <= tol).all()), res.detach(), "picard_counting")


@pytest.fixture
def registered():
    register_solver("picard_counting", picard_counting, replace=True)
    CALLS.clear()
    yield
    SOLVERS.pop("picard_counting", None)


def test_registered_solver_drives_point_solve_and_interval_search(registered):
    torch.manual_seed(0)
    deq = DEQ(IBPMonLinear(6), solver="picard_counting", tol=1e-8, max_iter=300, tag="point")
    model = nn.Sequential(nn.Linear(4, 6), deq, nn.Linear(6, 3))
    x = torch.rand(2, 4)
    reference = nn.Sequential(model[0], DEQ(model[1].cell, solver="anderson", tol=1e-8, max_iter=300), model[2])
    assert torch.allclose(model(x), reference(x), atol=1e-6)
    assert ("point", (2, 6)) in CALLS
    CALLS.clear()
    bounded = BoundedModule(model, x, bound_opts={"deq": {"solver": "picard_counting", "max_iter": 200}})
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),),
                                    method="IBP")
    # the interval search ran the user's solver on the stacked (lo, hi) state: (B, 2, n)
    assert ("user", (2, 2, 6)) in CALLS
    ref_lb, ref_ub = BoundedModule(reference, x).compute_bounds(
        x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),), method="IBP")
    assert torch.allclose(lb, ref_lb, atol=1e-4) and torch.allclose(ub, ref_ub, atol=1e-4)


def test_register_solver_validates_its_arguments(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_solver("anderson", picard_counting)
    with pytest.raises(TypeError, match="signature fn\\(f, z0, \\*, tol, max_iter"):
        register_solver("bad", lambda f, z0: (z0, None))
    with pytest.raises(ValueError, match="non-empty string"):
        register_solver("", picard_counting)
    with pytest.raises(ValueError, match="unknown solver 'nope'.*picard_counting"):
        DEQ(IBPMonLinear(4), solver="nope")
