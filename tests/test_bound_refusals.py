"""The DEQ node bounds what it can prove and refuses the rest: l_p balls straight into a DEQ, stale
caches after attribute changes, and bad input (NaN / inf / negative eps, NaN weights or C, wrong
dtype, invalid options)."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

import lirpa_deq  # noqa: F401
from lirpa_deq.bounds.injection import UnsupportedRegionError
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear, MonLinear, OrthoLinear
from lirpa_deq.nn.cells.generic_examples import TanhCell
from lirpa_deq.testing import ball_samples

METHODS = ["IBP", "CROWN", "CROWN-IBP"]


def _bounds(model, x, eps, method, norm=math.inf, C=None, bounded=None, opts=None):
    bounded = bounded or BoundedModule(model, x, bound_opts=opts or {})
    ptb = PerturbationLpNorm(norm=norm, eps=eps)
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method=method, C=C)
    return lb.detach(), ub.detach()


def _l1_samples(x, eps, n, generator):
    """The 2d vertices +-eps e_i of the l1 ball (where piecewise-linear maps peak) and random points."""
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype).view(d, 1, *x.shape[1:]) * eps
    direction = torch.randn((n, *x.shape), generator=generator, dtype=x.dtype).sign() * \
        torch.rand((n, *x.shape), generator=generator, dtype=x.dtype)
    direction = direction / direction.flatten(2).abs().sum(2).view(n, x.shape[0], *[1] * (x.dim() - 1))
    return torch.cat([x + eye, x - eye, x + eps * direction])


def _excess(model, x, eps, norm, lb, ub, n=400):
    """Largest amount by which the model's outputs at sampled points of the ball leave [lb, ub]."""
    gen = torch.Generator().manual_seed(1)
    pts = _l1_samples(x, eps, n, gen) if norm == 1 else ball_samples(x, eps, n, norm=norm, generator=gen)
    with torch.no_grad():  # one batched solve of every point
        out = model(pts.reshape(-1, *x.shape[1:])).view(pts.shape[0], *lb.shape)
    return float(torch.maximum(lb - out, out - ub).max())


def _tight(cell):  # a DEQ solved far below the bounds' widths: its outputs are ground truth
    return DEQ(cell, solver="fixed_point_iter" if isinstance(cell, TanhCell) else "anderson", tol=1e-10,
               max_iter=500, on_nonconvergence="ignore")


def _l2_models():
    torch.manual_seed(0)
    return {
        "fc-first": (nn.Sequential(_tight(IBPMonLinear(6)), nn.Linear(6, 3)), torch.rand(2, 6)),
        "flatten-first": (nn.Sequential(nn.Flatten(), _tight(IBPMonLinear(6)), nn.Linear(6, 3)),
                          torch.rand(2, 2, 3)),
        "conv-first": (nn.Sequential(_tight(IBPMonConv2d(2)), nn.Flatten(), nn.Linear(18, 3)),
                       torch.rand(2, 2, 3, 3)),
        "generic-first": (nn.Sequential(_tight(TanhCell(5, 6)), nn.Linear(5, 3)), torch.rand(2, 6)),
    }


@pytest.mark.parametrize("norm", [2, 1])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["fc-first", "flatten-first", "conv-first", "generic-first"])
def test_lp_ball_straight_into_a_deq_is_bounded_by_its_enclosing_box(kind, method, norm):
    model, x = _l2_models()[kind]
    model = model.double()
    x = x.double()
    eps = 0.5
    lb, ub = _bounds(model, x, eps, method, norm=norm)
    # the proved box covers the ball: outputs spread over a width of the order of eps, and all inside
    assert float((ub - lb).min()) > 1e-3
    assert _excess(model, x, eps, norm, lb, ub) <= 1e-6


def test_lp_box_is_the_ball_enclosing_box_for_a_deq_first_layer():
    torch.manual_seed(0)
    model = nn.Sequential(DEQ(IBPMonLinear(4)), nn.Linear(4, 2))
    x = torch.rand(3, 4)
    bounded = BoundedModule(model, x)
    _bounds(model, x, 0.25, "IBP", norm=2, bounded=bounded)
    node = lirpa_deq.deq_nodes(bounded)[0]
    lo, hi = node.box
    # l_inf and l2 of the same eps give the same injection box, hence the same proved box
    bounded_inf = BoundedModule(model, x)
    _bounds(model, x, 0.25, "IBP", bounded=bounded_inf)
    lo_inf, hi_inf = lirpa_deq.deq_nodes(bounded_inf)[0].box
    assert torch.allclose(lo, lo_inf) and torch.allclose(hi, hi_inf)


class _Scale(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize("method", METHODS)
def test_lp_ball_through_an_elementwise_op_into_a_deq_is_refused(method):
    torch.manual_seed(0)
    model = nn.Sequential(_Scale(), DEQ(IBPMonLinear(4)), nn.Linear(4, 2))
    x = torch.rand(2, 4)
    with pytest.raises(UnsupportedRegionError, match="Linear or Conv layer"):
        _bounds(model, x, 0.1, method, norm=2)
    lb, ub = _bounds(model, x, 0.1, method)  # l_inf through the same op stays supported
    assert bool((lb <= ub).all())


def test_lp_ball_through_a_linear_layer_is_bounded_norm_aware():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), _tight(IBPMonLinear(6)), nn.Linear(6, 3)).double()
    x = torch.rand(2, 5, dtype=torch.float64)
    for method in METHODS:
        lb, ub = _bounds(model, x, 0.3, method, norm=2)
        assert _excess(model, x, 0.3, 2, lb, ub) <= 1e-6


@pytest.mark.parametrize("method", ["IBP", "CROWN"])
@pytest.mark.parametrize("cell", ["ibp", "ortho"])
def test_cache_follows_a_margin_change_after_construction(cell, method):
    torch.manual_seed(0)
    c = IBPMonLinear(6, m=0.5) if cell == "ibp" else OrthoLinear(6, margin=0.5)
    model = nn.Sequential(nn.Linear(4, 6), _tight(c), nn.Linear(6, 3)).double()
    x = torch.rand(2, 4, dtype=torch.float64)
    bounded = BoundedModule(model, x)
    before = _bounds(model, x, 0.1, method, bounded=bounded)
    c.margin = 0.05  # a different W: the box proved for the old one no longer applies
    after = _bounds(model, x, 0.1, method, bounded=bounded)
    fresh = _bounds(model, x, 0.1, method)
    assert not torch.allclose(before[0], after[0])
    assert torch.allclose(after[0], fresh[0], atol=1e-9) and torch.allclose(after[1], fresh[1], atol=1e-9)
    assert _excess(model, x, 0.1, math.inf, *after) <= 1e-6


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, -0.2, float("nan"), float("inf"), True, "0.5"])
def test_ibp_mondeq_margin_is_validated_when_set(value):
    cell = IBPMonLinear(4)
    with pytest.raises(ValueError, match="margin"):
        cell.margin = value
    assert cell.margin == 0.5


def test_other_cells_validate_their_margin_too():
    with pytest.raises(ValueError, match="margin"):
        MonLinear(4).margin = -1.0
    with pytest.raises(ValueError, match="margin"):
        OrthoLinear(4).margin = 1.5
    cell = OrthoLinear(4)
    cell.margin = 1.0  # a legal value is kept
    assert cell.margin == 1.0


def _fc():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), DEQ(IBPMonLinear(6)), nn.Linear(6, 3)), torch.rand(2, 5)


def _first():
    torch.manual_seed(0)
    return nn.Sequential(DEQ(IBPMonLinear(6)), nn.Linear(6, 3)), torch.rand(2, 6)


@pytest.mark.parametrize("fallback", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [_fc, _first])
@pytest.mark.parametrize("eps, match", [(-0.5, "eps negative"), (float("nan"), "NaN or inf"),
                                        (float("inf"), "NaN or inf")])
def test_bad_eps_is_refused(make, method, fallback, eps, match):
    model, x = make()
    with pytest.raises(ValueError, match=match):
        _bounds(model, x, eps, method, opts={"deq": {"fallback": fallback}})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [_fc, _first])
def test_nan_input_is_refused(make, method):
    model, x = make()
    bounded = BoundedModule(model, x)
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        _bounds(model, x, 0.1, method, bounded=bounded)


@pytest.mark.parametrize("where", ["cell", "before"])
@pytest.mark.parametrize("method", METHODS)
def test_nan_weights_are_refused(where, method):
    model, x = _fc()
    bounded = BoundedModule(model, x)
    with torch.no_grad():
        (model[1].cell.M if where == "cell" else model[0].weight)[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        _bounds(model, x, 0.1, method, bounded=bounded)


@pytest.mark.parametrize("method", ["CROWN", "CROWN-IBP"])
def test_nan_specification_is_refused(method):
    model, x = _fc()
    C = torch.ones(2, 2, 3)
    C[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="specification matrix C"):
        _bounds(model, x, 0.1, method, C=C)


def test_nan_input_of_a_generic_cell_names_the_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), DEQ(TanhCell(6, 6)), nn.Linear(6, 3))
    x = torch.rand(2, 6)
    bounded = BoundedModule(model, x)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        _bounds(model, x, 0.1, "IBP", bounded=bounded)


def test_wrong_dtype_reaching_the_deq_says_what_was_expected():
    model, x = _first()
    bounded = BoundedModule(model, x)
    with pytest.raises(TypeError, match="float64 but its cell's parameters are torch.float32"):
        _bounds(model, x.double(), 0.1, "IBP", bounded=bounded)


def test_wrong_state_shape_reaching_the_deq_says_what_was_expected():
    model, x = _first()
    bounded = BoundedModule(model, x)
    with pytest.raises(ValueError, match=r"needs states of shape \(B, 6\), got \(2, 7\)"):
        _bounds(model, torch.rand(2, 7), 0.1, "IBP", bounded=bounded)


@pytest.mark.parametrize("opts, match", [
    ({"max_iter": "x"}, r"\['max_iter'\] must be an integer >= 1, got 'x'"),
    ({"max_iter": 0}, r"\['max_iter'\] must be an integer >= 1, got 0"),
    ({"max_iter": 2.5}, r"\['max_iter'\] must be an integer"),
    ({"tol": float("nan")}, r"\['tol'\] must be a finite real"),
    ({"retries": -1}, r"\['retries'\] must be an integer >= 0"),
    ({"fallback": "yes"}, r"\['fallback'\] must be True or False"),
    ({"adjoint_max_iter": 0}, r"\['adjoint_max_iter'\] must be an integer >= 1"),
    ({"adjoint_tol": -1.0}, r"\['adjoint_tol'\] must be a finite real"),
    ({"max_iters": 5}, r"unknown bound_opts\['deq'\] option\(s\) \['max_iters'\]"),
])
def test_invalid_deq_options_name_the_option(opts, match):
    model, x = _fc()
    with pytest.raises((ValueError, TypeError), match=match):
        BoundedModule(model, x, bound_opts={"deq": opts})


def test_valid_options_still_bound():
    model, x = _fc()
    lb, ub = _bounds(model, x, 0.05, "CROWN", opts={"deq": {"max_iter": 3, "adjoint_max_iter": 2}})
    assert bool(torch.isfinite(lb).all() and (lb <= ub).all())


def test_nan_specification_is_refused_under_ibp_too():
    model, x = _fc()
    C = torch.ones(2, 1, 3)
    C[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="specification matrix C contains NaN"):
        _bounds(model, x, 0.1, "IBP", C=C)


def test_unknown_method_names_the_method():
    model, x = _fc()
    with pytest.raises(NotImplementedError, match=r"method='IBPP'\) is not a bound method.*'CROWN-IBP'"):
        _bounds(model, x, 0.1, "IBPP")


@pytest.mark.parametrize("make", [lambda: MonLinear(4), lambda: OrthoLinear(4), lambda: IBPMonConv2d(2)])
def test_nan_cell_weights_are_refused_before_any_solve(make):
    cell = make()
    with torch.no_grad():
        next(cell.parameters()).view(-1)[0] = float("nan")
    x = torch.rand(2, 4) if not isinstance(cell, IBPMonConv2d) else torch.rand(2, 2, 3, 3)
    with pytest.raises(ValueError, match="contains NaN or inf"):
        BoundedModule(nn.Sequential(DEQ(cell)), x)


@pytest.mark.parametrize("shape", [(2, 4, 5), (3, 1, 3), (4, 3)])
def test_wrongly_shaped_specification_says_what_was_expected(shape):
    model, x = _fc()
    with pytest.raises(ValueError, match=r"C must have shape \(batch, specifications, outputs\) = \(2, S, 3\)"):
        _bounds(model, x, 0.1, "CROWN", C=torch.ones(shape))
