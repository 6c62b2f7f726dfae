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
    if method == "CROWN-Optimized":
        # auto_LiRPA 0.3's alpha-CROWN crashes on float64 models once bounds need gradients (its
        # best-bound buffers are float32; not DEQ-specific): run this case in float32
        model, x = model.float(), x.float()
        model[2].tol = 1e-6  # float32 cannot reach 1e-10
        lb, ub = _bounds(model, x, eps, method)
        assert_sound(model, x, eps, lb, ub, atol=1e-5, n_samples=200, pgd_steps=25)
        return
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


def conv_after_deq_model():
    # the Conv after the DEQ makes auto_LiRPA hand the node Patches coefficients (conv_mode 'patches')
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                         DEQ(IBPMonConv2d(3), solver="fixed_point_iter", tol=1e-10, max_iter=500),
                         nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).double()


def test_patches_coefficients_sound_and_return_A_reconstructs():
    model = conv_after_deq_model()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    eps = 0.05
    bounded = BoundedModule(model, x)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    final, inp = bounded.final_name, bounded.input_name[0]
    lb, ub, A = bounded.compute_bounds(x=(bx,), method="CROWN", return_A=True, needed_A_dict={final: [inp]})
    assert_sound(model, x, eps, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)
    entry = A[final][inp]
    xf = x.flatten(1).unsqueeze(-1)
    recon_l = (entry["lA"].flatten(2) @ xf).squeeze(-1) - eps * entry["lA"].flatten(2).abs().sum(-1) + entry["lbias"]
    recon_u = (entry["uA"].flatten(2) @ xf).squeeze(-1) + eps * entry["uA"].flatten(2).abs().sum(-1) + entry["ubias"]
    torch.testing.assert_close(recon_l, lb, atol=1e-5, rtol=0)
    torch.testing.assert_close(recon_u, ub, atol=1e-5, rtol=0)


def test_intermediate_bounds_after_the_deq_use_crown():
    """A ReLU after the DEQ needs bounds of the DEQ's successor; under CROWN they come from the
    backward pass through the DEQ node, and are tighter than IBP's."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12),
                          DEQ(IBPMonLinear(12), solver="fixed_point_iter", tol=1e-10, max_iter=500),
                          nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05))
    widths = {}
    for method in ("IBP", "CROWN"):
        lb, ub = bounded.compute_bounds(x=(bx,), method=method)
        assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)
        relu = next(m for m in bounded.modules() if type(m).__name__ == "BoundRelu")
        pre = relu.inputs[0]
        widths[method] = float((pre.upper - pre.lower).mean())
    assert widths["CROWN"] < widths["IBP"]


def test_forward_plus_backward_where_applicable():
    """method='forward+backward' works when no forward-mode bound of the DEQ is needed (the DEQ's
    own bounds then come from the backward pass) and is refused clearly when it is."""
    model = fc_model(0)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    lb, ub = _bounds(model, x, 0.05, "forward+backward")
    assert_sound(model, x, 0.05, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)
    torch.manual_seed(0)
    deeper = nn.Sequential(nn.Flatten(), nn.Linear(16, 8),
                           DEQ(IBPMonLinear(8), solver="fixed_point_iter", tol=1e-10, max_iter=500),
                           nn.ReLU(), nn.Linear(8, 3)).double()
    try:
        lb, ub = _bounds(deeper, x, 0.05, "forward+backward")
    except NotImplementedError as err:
        assert "forward-mode" in str(err)
    else:
        assert_sound(deeper, x, 0.05, lb, ub, atol=ATOL, n_samples=100, pgd_steps=10)


def test_crown_bound_gradients_reach_the_cell_and_the_output_layer():
    """CROWN-IBP training needs d(bound)/d(weights) for the DEQ cell and the layers after it; the
    bound is recomputed differentiably at the chosen adjoint vector (its value unchanged)."""
    model = fc_model(6)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05))
    lb, _ = bounded.compute_bounds(x=(bx,), method="CROWN-IBP")
    with torch.no_grad():
        lb_nograd, _ = bounded.compute_bounds(x=(bx,), method="CROWN-IBP")
    torch.testing.assert_close(lb, lb_nograd, atol=1e-10, rtol=0)
    params = dict(bounded.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(lb.sum(), list(params.values()), allow_unused=True)))
    for name in params:
        if name.endswith("cell.M") or name.startswith("3."):
            assert grads[name] is not None and float(grads[name].abs().sum()) > 0, name
