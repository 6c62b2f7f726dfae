"""alpha-CROWN through the DEQ: the node's own lower slopes (and optionally its adjoint shift) are
optimizable parameters of auto_LiRPA's CROWN-Optimized; every value of them is sound."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

from lirpa_deq.bounds.bound_deq import deq_nodes
from lirpa_deq.bounds.slopes import SHIFT
from lirpa_deq.nn import DEQ, IBPMonLinear
from lirpa_deq.testing import assert_sound


def _model(seed):
    # float32: auto_LiRPA 0.3's alpha-CROWN keeps its best bounds in float32 (docs/crown.md)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 20), DEQ(IBPMonLinear(20), tol=1e-7, max_iter=300),
                         nn.Linear(20, 5))


@pytest.mark.parametrize("deq_opts", [{}, {"crown_refine": 2, "optimize_adjoint": True, "refine_opt_steps": 3}])
def test_deq_slopes_are_optimized_soundly(deq_opts):
    model = _model(2)
    x = torch.rand(3, 1, 4, 4)
    eps = 0.1
    bm = BoundedModule(model, x, bound_opts={"deq": deq_opts, "optimize_bound_args": {"iteration": 8}})
    assert [type(n).__name__ for n in bm.optimizable_activations] == ["BoundDEQ"]
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    clb, cub = (t.detach() for t in bm.compute_bounds(x=(bx,), method="CROWN"))
    olb, oub = (t.detach() for t in bm.compute_bounds(x=(bx,), method="CROWN-Optimized"))
    assert_sound(model, x, eps, olb, oub, atol=1e-4, n_samples=100, pgd_steps=15)
    node = deq_nodes(bm)[0]
    slopes = {k: v for k, v in node.alpha.items() if not k.endswith(SHIFT)}
    assert len(slopes) == 1
    alpha = next(iter(slopes.values()))
    assert alpha.shape == (2, 5, 3, 20) and float(alpha.min()) >= 0 and float(alpha.max()) <= 1
    assert (SHIFT in "".join(node.alpha)) == bool(deq_opts.get("optimize_adjoint"))
    # never looser than CROWN (auto_LiRPA keeps the best iterate), strictly tighter somewhere
    assert bool((olb >= clb - 1e-5).all() and (oub <= cub + 1e-5).all())
    assert float((clb - olb).min()) < -1e-4 or float((oub - cub).min()) < -1e-4


def test_any_slopes_in_the_unit_interval_give_sound_bounds():
    """The theorem's requirement on the lower slope is only aL in [0, 1]: extreme and random slopes
    (set by hand, not optimized) stay sound."""
    model = _model(4)
    x = torch.rand(2, 1, 4, 4)
    eps = 0.15
    bm = BoundedModule(model, x, bound_opts={"optimize_bound_args": {"iteration": 1}})
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    bm.compute_bounds(x=(bx,), method="CROWN-Optimized")  # creates the alphas
    node = deq_nodes(bm)[0]
    gen = torch.Generator().manual_seed(0)
    widths = []
    for fill in ("zeros", "ones", "random"):
        for value in node.alpha.values():
            value.data = {"zeros": torch.zeros_like(value), "ones": torch.ones_like(value),
                          "random": torch.rand(value.shape, generator=gen)}[fill]
        lb, ub = (t.detach() for t in bm.compute_bounds(x=(bx,), method="CROWN", reuse_alpha=True))
        assert_sound(model, x, eps, lb, ub, atol=1e-4, n_samples=100, pgd_steps=15)
        widths.append(float((ub - lb).mean()))
    assert max(widths) - min(widths) > 1e-4, widths  # the slopes were used
