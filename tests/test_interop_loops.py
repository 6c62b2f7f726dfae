"""Unrolled fixed-point loops are detected (lirpa_deq.bounds.guard) and pointed to the DEQ layer."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import lirpa_deq  # noqa: F401
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.bounds.guard import UnrolledLoopError, UnrolledLoopWarning, unrolled_loop


class LoopModel(nn.Module):
    def __init__(self, steps, n=10):
        super().__init__()
        self.U, self.W, self.head, self.steps = nn.Linear(6, n), nn.Linear(n, n, bias=False), nn.Linear(n, 3), steps

    def forward(self, x):
        u = self.U(x)
        z = torch.zeros_like(u)
        for _ in range(self.steps):
            z = torch.relu(self.W(z) + u)
        return self.head(z)


def _bounds(bounded, x, method):
    return bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.1)),), method=method)


def test_repeated_block_is_found_with_its_length_and_weight():
    x = torch.randn(2, 6)
    assert unrolled_loop(BoundedModule(LoopModel(12).eval(), x)) == (12, "W.weight")
    assert unrolled_loop(BoundedModule(LoopModel(3).eval(), x)) is None  # three uses: a weight-tied net, not a loop
    mlp = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    assert unrolled_loop(BoundedModule(mlp, x)) is None


def test_ibp_on_an_unrolled_loop_warns_once_with_the_deq_path():
    x = torch.randn(2, 6)
    bounded = BoundedModule(LoopModel(12).eval(), x)
    with pytest.warns(UnrolledLoopWarning, match=r"repeats the same block 12 times.*lirpa_deq\.nn\.DEQ"):
        lb, ub = _bounds(bounded, x, "IBP")
    assert bool((lb <= ub).all())  # auto_LiRPA's (sound, loose) bounds of the unrolled network are returned
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnrolledLoopWarning)
        _bounds(bounded, x, "IBP")  # once per module


def test_a_failure_of_auto_lirpa_on_the_loop_names_the_path():
    x = torch.randn(2, 6)
    bounded = BoundedModule(LoopModel(12).eval(), x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnrolledLoopWarning)
            _bounds(bounded, x, "CROWN")
    except UnrolledLoopError as err:  # auto_LiRPA 0.3's CROWN asserts on this graph
        assert "lirpa_deq.nn.DEQ" in str(err) and "lirpa_deq.convert" in str(err)
        assert err.__cause__ is not None


def test_models_without_loops_are_untouched():
    x = torch.randn(2, 6)
    mlp = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lb, ub = _bounds(BoundedModule(mlp, x), x, "CROWN")
    assert bool((lb <= ub).all())
