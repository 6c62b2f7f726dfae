"""CROWN-tight relaxations inside the DEQ (lirpa_deq.bounds.refine / prefix): sound, never looser
than the interval box's relaxation, tighter on average, cached per input region."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

from lirpa_deq.bounds.bound_deq import deq_nodes
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear, TanhCell
from lirpa_deq.testing import assert_sound

ATOL = 1e-7


def _deq(cell):
    return DEQ(cell, solver="fixed_point_iter", tol=1e-10, max_iter=500)


def fc_model(seed, relu_before=False):
    torch.manual_seed(seed)
    pre = [nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 20)] if relu_before else [nn.Linear(16, 20)]
    return nn.Sequential(nn.Flatten(), *pre, _deq(IBPMonLinear(20)), nn.Linear(20, 5)).double()


def conv_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), _deq(IBPMonConv2d(3)), nn.Flatten(),
                         nn.Linear(48, 4)).double()


def _bounds(model, x, eps, method="CROWN", **deq):
    deq = {"crown_refine": 2, **deq}
    bm = BoundedModule(model, x, bound_opts={"deq": deq})
    lb, ub = bm.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),), method=method)
    return lb.detach(), ub.detach(), bm


# a ReLU before the DEQ: no affine prefix, rows concretized over the box of u (smaller gain)
@pytest.mark.parametrize("make,eps,relu_before,ratio", [(fc_model, 0.05, False, 0.97), (fc_model, 0.1, True, 0.99),
                                                        (conv_model, 0.05, False, 0.98)])
def test_refined_crown_sound_and_never_looser(make, eps, relu_before, ratio):
    widths = []
    for seed in range(2):
        model = make(seed, relu_before) if make is fc_model else make(seed)
        x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
        lb, ub, bm = _bounds(model, x, eps)
        assert_sound(model, x, eps, lb, ub, atol=ATOL, n_samples=100, pgd_steps=15)
        lb0, ub0, _ = _bounds(model, x, eps, crown_refine=0)
        assert bool((lb >= lb0 - 1e-9).all() and (ub <= ub0 + 1e-9).all())
        widths.append(float((ub - lb).mean() / (ub0 - lb0).mean()))
        cb = deq_nodes(bm)[0].cell_bounds
        state = cb._refined[3]
        proved = cb.last_box
        assert bool((state.box[0] >= proved[0]).all() and (state.box[1] <= proved[1]).all())
        assert state.info["rounds"] >= 1 and state.info["rows"] > 0
    assert sum(widths) / len(widths) < ratio, widths  # refinement tightens on average


def test_refinement_is_recomputed_for_a_new_input_region():
    """The refined state holds for ONE input region: a second call with another eps (same
    BoundedModule) must not reuse it, and both calls stay sound."""
    model = fc_model(3)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    bm = BoundedModule(model, x, bound_opts={"deq": {"crown_refine": 2}})
    for eps in (0.02, 0.08):
        lb, ub = bm.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),), method="CROWN")
        assert_sound(model, x, eps, lb.detach(), ub.detach(), atol=ATOL, n_samples=60, pgd_steps=10)
    region = deq_nodes(bm)[0].cell_bounds._refined[2]
    assert float(region[-1][0]) == 0.08


def test_refinement_of_a_generic_cell_tightens_its_box_and_stays_sound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), DEQ(TanhCell(8, 5, contraction=0.8), tol=1e-10, max_iter=300),
                          nn.Linear(8, 3)).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    lb, ub, bm = _bounds(model, x, 0.1)
    assert_sound(model, x, 0.1, lb, ub, atol=1e-6, n_samples=60, pgd_steps=10)
    lb0, ub0, _ = _bounds(model, x, 0.1, crown_refine=0)
    assert float((ub - lb).mean()) <= float((ub0 - lb0).mean()) + 1e-9
    cb = deq_nodes(bm)[0].cell_bounds
    tight, proved = cb._refined[3].box, cb.last_box
    assert float((tight[1] - tight[0]).sum()) < float((proved[1] - proved[0]).sum())


@pytest.mark.parametrize("key,value", [("crown_refine", -1), ("refine_max_rows", 0), ("refine_tol", 2.0),
                                       ("crown_gradient", "implicit")])
def test_bad_refinement_options_are_refused(key, value):
    model, x = fc_model(0), torch.rand(1, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=key):
        BoundedModule(model, x, bound_opts={"deq": {key: value}})


def test_prefix_concretization_is_exact_through_affine_layers():
    """min over the l_inf ball of <a, u(x)> with u = Linear(Flatten(x)): the closed form
    <a, u(x0)> - eps ||P^T a||_1 (what the refinement rows use instead of the box of u)."""
    from lirpa_deq.bounds.prefix import affine_prefix, concretize_lower

    model = fc_model(7)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    eps = 0.03
    bm = BoundedModule(model, x, bound_opts={"deq": {"crown_refine": 1}})
    bm.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),), method="CROWN")
    node = deq_nodes(bm)[0]
    prefix = affine_prefix(node.inputs[0])
    assert prefix is not None and len(prefix[0]) == 2  # Linear, Flatten
    a = torch.randn(5, 2, 20, dtype=torch.float64)
    got = concretize_lower(prefix, a)
    P, q = model[1].weight, model[1].bias
    u0 = model[1](x.flatten(1))
    want = torch.einsum("kbn,bn->kb", a, u0) - eps * (a @ P).abs().sum(-1)
    torch.testing.assert_close(got, want.detach(), atol=1e-10, rtol=0)
    assert affine_prefix(deq_nodes(BoundedModule(fc_model(7, relu_before=True), x))[0].inputs[0]) is None
