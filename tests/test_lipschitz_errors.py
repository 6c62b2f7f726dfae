"""Regressions for lirpa_deq.lipschitz: no NaN bounds (MonDEQ / orthogonal cells behind an
explicit ReLU), a DEQ as the first layer, up-front validation of every argument of every public
entry point, and the progress bar."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import lirpa_deq._progress as progress_mod
from lirpa_deq.lipschitz import (LipschitzFallbackWarning, LipschitzOptions, certify_lipschitz,
                                 lipschitz_report, local_lipschitz, margin_spec)
from lirpa_deq.lipschitz.api import tightest
from lirpa_deq.lipschitz.backprop import abs_apply, relu_mult
from lirpa_deq.lipschitz.empirical import gradient_norms, sampled_lipschitz
from lirpa_deq.lipschitz.layers import flatten_model
from lirpa_deq.lipschitz.propagation import _deq_setup
from lirpa_deq.lipschitz.region import analyse
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear, MonLinear, OrthoLinear

F64 = torch.float64


def relu_deq(cell, seed=0, bias=None):
    """Linear(6, 8) -> ReLU -> DEQ(cell) -> Linear(8, 3), float64."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), DEQ(cell, tol=1e-11, max_iter=1000),
                      nn.Linear(8, 3)).double()
    if bias is not None:
        with torch.no_grad():
            m[0].bias.fill_(bias)
    return m


X6 = torch.rand(2, 6, dtype=F64, generator=torch.Generator().manual_seed(6))


# ------------------------------------------------------------------------- 1. never NaN
@pytest.mark.parametrize("make", [lambda: MonLinear(8), lambda: OrthoLinear(8)])
def test_mondeq_ortho_behind_relu_fall_back_to_global_not_nan(make):
    torch.manual_seed(0)
    m = relu_deq(make())
    with pytest.warns(LipschitzFallbackWarning, match="6 row"):
        r = lipschitz_report(m, X6, 0.01, math.inf, "local")
    # before: elementwise (inf * 0 at the inactive ReLU) and the combined bound were NaN
    assert torch.equal(r.raw["elementwise"], torch.full((2, 3), math.inf, dtype=F64))
    assert torch.equal(r.raw["local"], torch.full((2, 3), math.inf, dtype=F64))
    assert torch.equal(r.bound, r.raw["global"]) and torch.isfinite(r.bound).all()
    C = torch.eye(3, dtype=F64).expand(2, -1, -1)
    assert (sampled_lipschitz(m, X6, 0.01, C, n_samples=16) <= r.bound).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LipschitzFallbackWarning)
        cert, low = certify_lipschitz(m, X6, torch.tensor([0, 1]), 0.01)
    assert torch.isfinite(low).all() and torch.equal(cert, low > 0)


@pytest.mark.parametrize("cell", [MonLinear, OrthoLinear])
def test_exact_zero_times_unbounded_is_zero(cell):
    """A zero Linear feeds the DEQ: f does not depend on x, gradient 0. The DEQ's own rows are
    unproved (inf: no rho proof) but meet only exact zero weights: every bound is exactly 0."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), DEQ(cell(8), tol=1e-11, max_iter=1000),
                      nn.Linear(8, 3)).double()
    with torch.no_grad():
        m[2].weight.zero_()
        m[2].bias.uniform_(0.5, 1.5)
    region = analyse(flatten_model(m), X6, 0.1, math.inf)
    assert not _deq_setup(region.per_layer[3], 6)[2].any()  # the DEQ rows are inf
    with warnings.catch_warnings():
        warnings.simplefilter("error", LipschitzFallbackWarning)  # 0 is a proved value
        r = lipschitz_report(m, X6, 0.1, math.inf, "local")
    zero = torch.zeros(2, 3, dtype=F64)
    assert torch.equal(r.raw["elementwise"], zero) and torch.equal(r.raw["local"], zero)  # were NaN
    assert torch.equal(r.bound, zero)


def test_inf_helpers_give_zero_for_exact_zeros():
    layer = flatten_model(nn.Linear(2, 2, bias=False).double())[0]
    with torch.no_grad():
        layer.W.copy_(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
        layer.absW.copy_(layer.W.abs())
    g = torch.tensor([[math.inf, 1.0]], dtype=F64)
    plain = layer.abs_t(g, (2,))
    assert torch.isnan(plain[0, 1])  # the bug: 0 * inf in the matrix product
    out = abs_apply(lambda t: layer.abs_t(t, (2,)), g)
    assert out[0, 0] == math.inf and out[0, 1] == 0.0
    gc = torch.tensor([[0.5, 0.5, 0.5]], dtype=F64)
    gr = torch.full_like(gc, math.inf)
    act, inact = torch.tensor([[True, False, False]]), torch.tensor([[False, True, False]])
    c, r = relu_mult(gc, gr, act, inact)
    assert c.tolist() == [[0.5, 0.0, 0.0]] and r.tolist() == [[math.inf, 0.0, math.inf]]


def test_tightest_never_poisoned():
    a = torch.tensor([math.nan, 1.0, math.inf, math.nan, 4.0], dtype=F64)
    b = torch.tensor([2.0, math.nan, 3.0, math.nan, math.inf], dtype=F64)
    assert tightest(a, b).tolist() == [2.0, 1.0, 3.0, math.inf, 4.0]
    assert torch.isnan(torch.minimum(a, b)[0])  # what the old combination did


# ------------------------------------------------------------------- 2. DEQ first layer
@pytest.mark.parametrize("norm", [math.inf, 2])
def test_deq_first_layer(norm):
    torch.manual_seed(0)
    m = nn.Sequential(DEQ(IBPMonLinear(8), tol=1e-11, max_iter=1000), nn.Linear(8, 3)).double()
    x = torch.rand(2, 8, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LipschitzFallbackWarning)
        r = lipschitz_report(m, x, 0.01, norm, "local")  # crashed: max() arg is an empty sequence
        r_nocrown = lipschitz_report(m, x, 0.01, norm, "local", options=dict(crown=False))
    C = torch.eye(3, dtype=F64).expand(2, -1, -1)
    lower = sampled_lipschitz(m, x, 0.01, C, norm, n_samples=16)
    for raw in (r.raw, r_nocrown.raw):
        for name, b in raw.items():
            assert (lower <= b * (1 + 1e-9)).all(), name
    assert (r.bound <= r_nocrown.bound).all() and (r.bound < r.raw["global"]).all()
    # a tiny ball is a linear region: the local bound is the gradient norm at x
    tiny = local_lipschitz(m, x, 1e-8, norm)
    assert torch.allclose(tiny, gradient_norms(m, x, C, norm), rtol=1e-8)
    cert, low = certify_lipschitz(m, x, torch.tensor([0, 1]), 1e-3, norm)
    assert torch.isfinite(low).all()


def test_deq_first_conv():
    torch.manual_seed(0)
    m = nn.Sequential(DEQ(IBPMonConv2d(2), tol=1e-11, max_iter=1000), nn.Flatten(),
                      nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.rand(2, 2, 4, 4, dtype=F64)
    L = local_lipschitz(m, x, 0.01)
    C = torch.eye(3, dtype=F64).expand(2, -1, -1)
    assert (sampled_lipschitz(m, x, 0.01, C, n_samples=16) <= L * (1 + 1e-9)).all()
    with pytest.raises(ValueError, match=r"IBPMonConv2d\(2\) needs states of shape \(B, 2, H, W\)"):
        local_lipschitz(m, torch.rand(2, 3, 4, 4, dtype=F64), 0.01)


# ----------------------------------------------------------------------- 3. validation
def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 10), DEQ(IBPMonLinear(10), tol=1e-10, max_iter=500),
                         nn.Linear(10, 3)).double()


X = torch.rand(2, 8, dtype=F64, generator=torch.Generator().manual_seed(8))
ENTRY = {
    "report": lambda m, x, eps, **kw: lipschitz_report(m, x, eps, **kw),
    "local": lambda m, x, eps, **kw: local_lipschitz(m, x, eps, **kw),
    "certify": lambda m, x, eps, **kw: certify_lipschitz(m, x, torch.tensor([0, 1]), eps, **kw),
}


@pytest.mark.parametrize("entry", ENTRY)
@pytest.mark.parametrize("eps,match", [
    (-0.1, r"eps must be a finite real number >= 0 \(the radius of the perturbation ball\), got -0.1: a "
           r"negative radius is an empty ball"),
    (float("nan"), r"got nan: a NaN radius certifies nothing"),
    (float("inf"), r"got inf: use a finite radius"),
    ("0.1", r"eps must be a finite real number >= 0 .*got '0.1' of type str"),
    (True, r"eps must be a finite real number >= 0 .*got True of type bool"), (None, r"got None of type NoneType"),
    (torch.tensor([0.1, 0.2]), r"got tensor\(\[0.1000, 0.2000\]\) of type Tensor"),
])
def test_eps_refused(entry, eps, match):
    with pytest.raises(ValueError, match=match):
        ENTRY[entry](small(), X, eps)


@pytest.mark.parametrize("entry", ENTRY)
@pytest.mark.parametrize("x,match", [
    (torch.tensor([[0.0, math.nan] + [0.0] * 6, [0.0] * 8], dtype=F64), r"x contains 1 NaN and 0 infinite values \(samples \[0\]\)"),
    (torch.tensor([[0.0] * 8, [math.inf] + [0.0] * 7], dtype=F64), r"x contains 0 NaN and 1 infinite values \(samples \[1\]\)"),
    (torch.rand(8, dtype=F64), r"non-empty batch .*got shape \(8,\).*x\.unsqueeze\(0\)"),
    (torch.rand(0, 8, dtype=F64), r"got shape \(0, 8\)"),
    (torch.rand(2, 7, dtype=F64), r"layer 1 \(Linear\) expects inputs \(B, \.\.\., 8\) \[in_features=8\], got \(B, 7\)"),
    (torch.rand(2, 8), r"x is float32 but the model's parameters are float64; use x\.double\(\) or model\.float\(\)"),
    (torch.rand(2, 8).half(), r"x must be float32 or float64, got torch\.float16"),
    ([[0.0] * 8] * 2, r"x must be a torch\.Tensor of shape \(B, \*input_shape\), got list"),
])
def test_x_refused(entry, x, match):
    with pytest.raises(ValueError, match=match):
        ENTRY[entry](small(), x, 0.1)


def test_x_shape_for_conv_and_output_rank():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d\) expects inputs \(B, 1, H, W\), got \(B, 16\)"):
        local_lipschitz(conv, torch.rand(2, 16, dtype=F64), 0.1)
    with pytest.raises(ValueError, match=r"cannot be applied to its input of shape \(B, 1, 2, 2\)"):
        local_lipschitz(conv, torch.rand(2, 1, 2, 2, dtype=F64), 0.1)  # smaller than the kernel
    no_flat = nn.Sequential(nn.Conv2d(1, 2, 3)).double()
    with pytest.raises(ValueError, match=r"logits of shape \(B, num_classes\), got \(2, 2, 2, 2\)"):
        local_lipschitz(no_flat, torch.rand(2, 1, 4, 4, dtype=F64), 0.1)


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([0, 1, 2]), r"labels must have shape \(B,\) = \(2,\), one label per input, got \(3,\)"),
    (torch.tensor([[0, 1]]), r"labels must have shape \(B,\) = \(2,\), one label per input, got \(1, 2\)"),
    (torch.tensor([0, 3]), r"labels has labels in \[0, 3\], outside \[0, 3\) \(num_classes=3\)"),
    (torch.tensor([-1, 0]), r"labels in \[-1, 0\], outside"),
    (torch.tensor([0.0, 1.0]), r"integer class indices, got torch\.float32; use labels\.long\(\)"),
    ([0, 1], r"labels must be a torch\.Tensor .*got list"),
])
def test_labels_refused(labels, match):
    with pytest.raises(ValueError, match=match):
        certify_lipschitz(small(), X, labels, 0.1)
    with pytest.raises(ValueError, match=match):
        margin_spec(labels, 3, X)


def test_margin_spec_checks_its_other_arguments():
    with pytest.raises(ValueError, match="at least 2 classes, the model has 1"):
        margin_spec(torch.tensor([0, 0]), 1, X)
    with pytest.raises(ValueError, match="num_classes must be an int"):
        margin_spec(torch.tensor([0, 0]), 3.0, X)
    C = margin_spec(torch.tensor([2, 0]), 3, X)
    assert C.dtype == F64 and C[0].tolist() == [[-1.0, 0.0, 1.0], [0.0, -1.0, 1.0]]


@pytest.mark.parametrize("C,match", [
    (torch.zeros(3, 3, dtype=F64), r"got \(3, 3\): the same rows for every sample are C\.expand\(2, -1, -1\)"),
    (torch.zeros(2, 1, 4), r"C must be a tensor of shape \(B=2, K, num_classes=3\), got \(2, 1, 4\)"),
    (torch.zeros(2, 0, 3), r"no specification rows \(K = 0\)"),
    (torch.full((2, 1, 3), math.nan), r"C contains NaN"),
    (torch.zeros(2, 1, 3, dtype=torch.bool), r"C must be a real tensor, got torch\.bool"),
    ("rows", r"got str"),
])
def test_C_refused(C, match):
    with pytest.raises(ValueError, match=match):
        local_lipschitz(small(), X, 0.1, C=C)


@pytest.mark.parametrize("entry", ENTRY)
@pytest.mark.parametrize("options,match", [
    ({"max_leaf": 8}, r"unknown option\(s\) 'max_leaf' \(did you mean 'max_leaves'\?\)"),
    ({"zzz": 1}, r"unknown option\(s\) 'zzz'; valid: \["),
    (dict(crown="yes"), r"crown must be True or False, got 'yes'"),
    (dict(tail_rtol=math.inf), r"tail_rtol must be a finite number > 0"),
    (dict(interval=5), r"interval must be None, a dict or .*IntervalOptions, got int"),
    (dict(interval={"bogus": 1}), r"interval: .*bogus"),
    (dict(max_unroll=0), r"max_unroll must be a positive integer, got 0"),
    ([("crown", False)], r"options must be None, a dict or LipschitzOptions, got list"),
])
def test_options_refused(entry, options, match):
    with pytest.raises(ValueError, match=match):
        ENTRY[entry](small(), X, 0.1, options=options)


@pytest.mark.parametrize("entry", ENTRY)
def test_progress_and_norm_method_refused(entry):
    with pytest.raises(ValueError, match="progress must be True or False, got 'yes'"):
        ENTRY[entry](small(), X, 0.1, progress="yes")
    with pytest.raises(ValueError, match="norm must be math.inf"):
        ENTRY[entry](small(), X, 0.1, norm=1)
    with pytest.raises(ValueError, match="unknown method 'crown'"):
        ENTRY[entry](small(), X, 0.1, method="crown")


def test_interval_options_dict_accepted():
    opts = LipschitzOptions(interval={"max_iter": 80})
    assert opts.interval.max_iter == 80
    a = local_lipschitz(small(), X, 0.05, options=dict(interval={"max_iter": 80}))
    assert torch.isfinite(a).all()


def test_eps_zero_certify_no_nan():
    cert, low = certify_lipschitz(small(), X, torch.tensor([0, 1]), 0.0)
    assert torch.isfinite(low).all() and torch.equal(cert, low > 0)
    eps_t = certify_lipschitz(small(), X, torch.tensor([0, 1]), torch.tensor(0.0))[1]
    assert torch.equal(low, eps_t)


# -------------------------------------------------------------------------- 4. progress
def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    m = small()
    quiet = local_lipschitz(m, X, 0.05)
    assert capsys.readouterr().err == ""
    local_lipschitz(m, X, 0.05, progress=True)  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_mod, "stderr_is_tty", lambda: True)
    ticks = []
    advance = progress_mod.Progress.advance
    monkeypatch.setattr(progress_mod.Progress, "advance", lambda self, n=1: (ticks.append(n), advance(self, n)))
    shown = local_lipschitz(m, X, 0.05, progress=True)
    err = capsys.readouterr().err
    assert ticks == [1, 1]  # one per refined sample
    assert "lipschitz" in err and "0/2" in err and "2/2" in err
    assert all(stage in err for stage in ("global", "region", "elementwise", "local", "refine"))
    assert torch.equal(quiet, shown)
    local_lipschitz(m, X, 0.05, progress=False)
    assert capsys.readouterr().err == ""


def test_cli_lipschitz_batch_progress(monkeypatch, capsys):
    from lirpa_deq.cli.methods import _lipschitz_batch

    m, y = small(), torch.tensor([0, 1])
    monkeypatch.setattr(progress_mod, "stderr_is_tty", lambda: True)
    c1, m1 = _lipschitz_batch(m, X, y, 0.01, [], progress=False)
    assert capsys.readouterr().err == ""
    c2, m2 = _lipschitz_batch(m, X, y, 0.01, [])
    assert "lipschitz" in capsys.readouterr().err
    assert torch.equal(c1, c2) and torch.equal(m1, m2)
    ref = certify_lipschitz(m, X, y, 0.01)[1].float()
    assert torch.equal(m1, ref)
    monkeypatch.setattr(progress_mod, "stderr_is_tty", lambda: False)
    _lipschitz_batch(m, X, y, 0.01, [])
    assert capsys.readouterr().err == ""
