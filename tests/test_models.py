"""Model registry and builders: every builder goes through BoundedModule and its IBP bounds are
sound against sampled, vertex and PGD points (small widths, float64, tight DEQ solves so the
model's outputs are the true fixed point up to ~1e-9)."""
import math

import pytest
import torch
from auto_LiRPA import BoundedTensor, PerturbationLpNorm

from lirpa_deq.models import MODELS, build_model, model_entry
from lirpa_deq.nn import DEQ
from lirpa_deq.testing import assert_sound
from lirpa_deq.training import make_bounded

TIGHT = {"tol": 1e-9, "max_iter": 300}


def small(name, seed=0, input_shape=(1, 8, 8), width=4):
    torch.manual_seed(seed)
    kw = {"width": width}
    if MODELS[name].is_deq:
        kw["deq_opts"] = TIGHT
    return build_model(name, input_shape, 10, **kw).double().eval()


def test_registry_lists_and_rejects():
    assert {"fc-deq", "conv-fc-deq", "deq3", "deq7", "ortho-deq3", "ortho-deq7", "cnn3", "cnn7"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'nope'.*fc-deq"):
        build_model("nope")
    with pytest.raises(ValueError, match="unknown option.*'depth'.*valid options"):
        build_model("fc-deq", depth=3)
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        build_model("deq3", width=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("deq3", (1, 10, 10))
    assert model_entry("cnn7").is_deq is False


def test_paper_shapes():
    """Default widths: DEQ-3 has a 128-channel IBP-MonConv DEQ, DEQ-7 a 64-channel one followed by
    CNN-7's 128-channel convs and a 512-unit linear layer; ortho variants use Ortho cells."""
    deq3 = build_model("deq3", (3, 32, 32))
    cell = [m for m in deq3.modules() if isinstance(m, DEQ)][0].cell
    assert type(cell).__name__ == "IBPMonConv2d" and cell.channels == 128
    assert deq3(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    deq7 = build_model("deq7", (1, 28, 28), width=8)
    assert [m.out_features for m in deq7.modules() if isinstance(m, torch.nn.Linear)] == [64, 10]
    ortho = build_model("ortho-deq7", (1, 28, 28), width=4)
    assert type([m for m in ortho.modules() if isinstance(m, DEQ)][0].cell).__name__ == "OrthoConv2d"
    assert not any(isinstance(m, DEQ) for m in build_model("cnn3", width=4).modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_ibp_bounds_sound(name):
    model = small(name)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    eps = 0.03
    bounded = make_bounded(model, x)
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps)),),
                                    method="IBP")
    assert lb.shape == ub.shape == (2, 10) and bool((lb <= ub).all())
    out = model(x)
    assert bool(((lb <= out + 1e-9) & (out <= ub + 1e-9)).all())
    assert_sound(model, x, eps, lb, ub, atol=1e-7, n_samples=48, pgd_steps=8)


@pytest.mark.parametrize("name", ["fc-deq", "deq3"])
def test_crown_bounds_sound_and_not_looser(name):
    model = small(name, seed=1)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    bounded = make_bounded(model, x)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.02))
    ilb, iub = bounded.compute_bounds(x=(bx,), method="IBP")
    clb, cub = bounded.compute_bounds(x=(bx,), method="CROWN")
    assert_sound(model, x, 0.02, clb, cub, atol=1e-7, n_samples=48, pgd_steps=8)
    lb, ub = torch.maximum(clb, ilb), torch.minimum(cub, iub)
    assert bool((ub - lb <= iub - ilb + 1e-12).all())
