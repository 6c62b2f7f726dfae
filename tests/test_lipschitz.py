"""Lipschitz bounds of DEQ classifiers: sound against sampled / ascended true gradients, ordered
(local <= elementwise <= global), exact in linear regions, and certification that PGD cannot break."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

from lirpa_deq.lipschitz import (LipschitzFallbackWarning, certify_lipschitz, lipschitz_report,
                                 local_lipschitz, margin_spec)
from lirpa_deq.lipschitz.empirical import empirical_lipschitz, gradient_norms, sampled_lipschitz
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear, MonLinear, OrthoLinear
from lirpa_deq.testing import pgd_extremes

RTOL = 1e-7  # true gradients come from DEQ solves at tol 1e-10 (float64)


def deq(cell):
    return DEQ(cell, tol=1e-10, max_iter=500)


def fc_model(seed, hidden=16, relu=True, scale=1.0, similarity=False):
    torch.manual_seed(seed)
    cell = IBPMonLinear(hidden, similarity=similarity)
    if similarity:
        with torch.no_grad():
            cell.s.normal_(0, 1.0)
    pre = [nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden)] if relu else [nn.Linear(16, hidden)]
    m = nn.Sequential(nn.Flatten(), nn.Sequential(*pre), deq(cell), nn.Linear(hidden, 5)).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.mul_(scale)
    return m


def deep_model(seed, hidden=14):
    """IBP-MonDEQ-style injection relu(BN(U x)) and an unstable ReLU after the DEQ as well."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                      deq(IBPMonLinear(hidden)), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 5)).double()
    with torch.no_grad():
        m[2].running_mean.uniform_(-0.3, 0.3)
        m[2].running_var.uniform_(0.3, 1.5)
    return m.eval()


def explicit_model(seed):
    """No DEQ at all: strided conv, ceil-mode pooling, two ReLU layers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True),
                         nn.Flatten(), nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def conv_model(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), deq(IBPMonConv2d(3)), nn.ReLU(),
                      nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)).double()
    with torch.no_grad():
        bn = m[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def _all_methods(model, x, eps, norm, C=None):
    r = lipschitz_report(model, x, eps, norm, "local", C)
    return r, {m: r.raw[m] for m in ("global", "elementwise", "local")}


CASES = [  # (model factory, eps, norm)
    (lambda: fc_model(0), 0.01, math.inf), (lambda: fc_model(1), 0.1, math.inf),
    (lambda: fc_model(2, relu=False, hidden=20), 0.05, math.inf),
    (lambda: fc_model(3, relu=False, hidden=20), 1.0, math.inf),  # eps large: all unstable
    (lambda: fc_model(4, scale=6.0, similarity=True), 0.03, math.inf),  # large weights
    (lambda: fc_model(5), 0.1, 2), (lambda: fc_model(6, relu=False, hidden=20), 0.5, 2),
    (lambda: conv_model(0), 0.05, math.inf), (lambda: conv_model(1), 0.5, math.inf),
    (lambda: conv_model(2), 0.2, 2), (lambda: deep_model(0), 0.05, math.inf),
    (lambda: deep_model(1), 0.2, 2), (lambda: explicit_model(0), 0.1, math.inf),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bounds_above_empirical_gradients(case):
    make, eps, norm = CASES[case]
    model = make()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # IBP-MonDEQ: no fallback may be needed
        r, raw = _all_methods(model, x, eps, norm)
    C = torch.eye(r.bound.shape[1], dtype=x.dtype).expand(2, -1, -1)
    lower = empirical_lipschitz(model, x, eps, C, norm, n_samples=48, steps=12, restarts=2, seed=case)
    assert (lower > 0).all()
    for name, bound in raw.items():
        worst = float((lower / bound).max())
        assert worst <= 1 + RTOL, f"{name} bound violated: empirical / bound = {worst}"
    # the requested (min-combined) bound is the local one and is never looser than global
    assert torch.equal(r.bound, torch.minimum(torch.minimum(raw["global"], raw["elementwise"]), raw["local"]))


@pytest.mark.parametrize("seed", range(3))
def test_ordering_local_elementwise_global(seed):
    model = fc_model(seed, relu=seed != 1)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    for eps in (0.02, 0.2):
        out = {m: local_lipschitz(model, x, eps, math.inf, m) for m in ("global", "elementwise", "local")}
        assert (out["local"] <= out["elementwise"] * (1 + 1e-9)).all()
        assert (out["elementwise"] <= out["global"] * (1 + 1e-9)).all()
        # the raw local bound (interval propagation alone, no refinement) is below raw elementwise
        r = lipschitz_report(model, x, eps, math.inf, "local")
        assert (r.info["local_interval"] <= r.raw["elementwise"] * (1 + 1e-6)).all()
    # and the local bound is much tighter than the closed form on these models
    assert float((out["global"] / out["local"]).median()) > 3


@pytest.mark.parametrize("make,refine", [(lambda: fc_model(7), True), (lambda: fc_model(7), False),
                                         (lambda: conv_model(3), True), (lambda: conv_model(3), False)])
def test_linear_region_is_exact(make, refine):
    model = make()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    eps = 1e-7
    r = lipschitz_report(model, x, eps, math.inf, "local", options=dict(refine=refine))
    assert sum(r.info["unstable"]) == 0, "the tiny ball must be a linear region"
    C = torch.eye(r.bound.shape[1], dtype=x.dtype).expand(2, -1, -1)
    exact = gradient_norms(model, x, C, math.inf)
    assert (r.bound - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert (r.bound >= exact * (1 - RTOL)).all()


def test_certified_points_survive_pgd():
    torch.manual_seed(0)
    model = fc_model(8, relu=False, hidden=20)
    x = torch.rand(12, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        labels = model(x).argmax(1)
    eps = 0.01
    cert, lower = certify_lipschitz(model, x, labels, eps)
    cert_g, lower_g = certify_lipschitz(model, x, labels, eps, method="global")
    assert int(cert.sum()) >= 3, f"too few certified points to test: {int(cert.sum())}"
    assert (lower >= lower_g - 1e-9).all() and int(cert.sum()) >= int(cert_g.sum())
    C = margin_spec(labels, 5, x)

    def margins(z):  # (N, 4) margins f_y - f_j at points of the batch replicated by pgd_extremes
        reps = z.shape[0] // x.shape[0]
        return torch.einsum("nkc,nc->nk", C.repeat(reps, 1, 1), model(z))

    lo_pts, _ = pgd_extremes(margins, x, eps, steps=25, restarts=1)
    with torch.no_grad():
        vals = [margins(lo_pts[0, k])[:, k] for k in range(C.shape[1])]  # attack on margin k
        worst = torch.stack(vals + [margins(x).min(1).values]).min(0).values
    assert (worst >= lower - 1e-9).all(), "margin_lower is not a lower bound"
    assert (worst[cert] > 0).all(), "a certified point was broken by PGD"


# ------------------------------------------------------------ property: sound, never NaN
def property_model(cell, prefix, seed, d=6, n=8):
    """Random (prefix) -> DEQ(cell(n)) -> Linear(n, 3); prefix 'first': the DEQ takes x itself."""
    torch.manual_seed(seed)
    pre = {"first": [], "linear": [nn.Linear(d, n)], "relu": [nn.Linear(d, n), nn.ReLU()]}[prefix]
    m = nn.Sequential(*pre, DEQ(cell(n), tol=1e-11, max_iter=1000), nn.Linear(n, 3)).double()
    return m, torch.rand(2, n if prefix == "first" else d, dtype=torch.float64)


@pytest.mark.parametrize("prefix", ["first", "linear", "relu"])
@pytest.mark.parametrize("cell", [IBPMonLinear, MonLinear, OrthoLinear])
def test_property_sound_and_never_nan(cell, prefix):
    """Every method's own bound >= the largest true gradient norm at 16 sampled points of the ball
    and at x (autograd through the DEQ solved at tol 1e-11; the 1e-9 slack covers that solve's
    error), the combined
    bound is finite and the minimum of the raw ones; MonDEQ / orthogonal cells behind an explicit
    ReLU used to give NaN (inf * 0), a DEQ first layer used to crash."""
    finite_rows = 0
    for seed, eps, norm in ((0, 1e-3, math.inf), (1, 0.1, 2)):
        m, x = property_model(cell, prefix, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if cell is not IBPMonLinear else "error",
                                  LipschitzFallbackWarning)
            r = lipschitz_report(m, x, eps, norm, "local")
        C = torch.eye(3, dtype=x.dtype).expand(2, -1, -1)
        lower = sampled_lipschitz(m, x, eps, C, norm, n_samples=16, seed=seed)  # incl. vertices
        assert (lower > 0).all()
        for name, bound in r.raw.items():
            assert not torch.isnan(bound).any(), f"{name}: NaN bound"
            assert float((lower / bound).max()) <= 1 + 1e-9, f"{name} bound below a true gradient"
        finite_rows += int(torch.isfinite(r.raw["local"]).sum())
        assert torch.isfinite(r.bound).all()
        expect = torch.minimum(torch.minimum(r.raw["global"], r.raw["elementwise"]), r.raw["local"])
        assert torch.equal(r.bound, expect)
    if cell is IBPMonLinear:  # the interval proof always applies: no fallback on any row
        assert finite_rows == 12
    elif cell is MonLinear:  # rho(Dbar |W|) < 1 is proved at least at eps = 1e-3
        assert finite_rows > 0

