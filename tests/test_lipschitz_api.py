"""lirpa_deq.lipschitz: input validation, shapes/dtypes, fallbacks, and the proof components
(Neumann post-fixpoints, closed forms, the vertex enumeration) checked against dense algebra."""
import itertools
import math
import warnings

import pytest
import torch
import torch.nn as nn

from lirpa_deq.lipschitz import (LipschitzFallbackWarning, certify_lipschitz, lipschitz_report,
                                 local_lipschitz)
from lirpa_deq.lipschitz.closed_form import deq_opnorm
from lirpa_deq.lipschitz.layers import flatten_model
from lirpa_deq.lipschitz.leaves import leaf_bound
from lirpa_deq.lipschitz.neumann import NonnegOp, neumann_bound, rho_direction
from lirpa_deq.nn import DEQ, IBPMonLinear, MonLinear, OrthoLinear
from lirpa_deq.nn.cells.base import MatrixOperator


def small(dtype=torch.float64, cell=None, hidden=10):
    torch.manual_seed(0)
    cell = cell or IBPMonLinear(hidden)
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    return nn.Sequential(nn.Flatten(), nn.Linear(8, hidden), DEQ(cell, tol=tol, max_iter=500),
                         nn.Linear(hidden, 3)).to(dtype)


X = torch.rand(2, 8, dtype=torch.float64)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-0.1), "eps must be"), (dict(eps=float("nan")), "eps must be"),
    (dict(eps=True), "eps must be"), (dict(norm=1), "norm must be"), (dict(norm="l3"), "norm must be"),
    (dict(method="crown"), "unknown method"), (dict(C=torch.zeros(2, 1, 4)), "C must be a tensor of shape"),
    (dict(C=torch.zeros(3, 1, 3)), "C must be"), (dict(C=torch.zeros(2, 0, 3)), "no specification rows"),
    (dict(options={"bogus": 1}), "unknown option"), (dict(options=dict(on_fallback="x")), "on_fallback"),
])
def test_bad_arguments(kwargs, match):
    args = dict(eps=0.1, norm=math.inf, method="local", C=None, options=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        local_lipschitz(small(), X, **args)


def test_bad_x_model_and_labels():
    m = small()
    with pytest.raises(ValueError, match="NaN"):
        local_lipschitz(m, torch.full((2, 8), float("nan"), dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="float32 or float64"):
        local_lipschitz(m, torch.ones(2, 8, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match=r"layer 1 \(Linear\) expects inputs \(B, \.\.\., 8\).*got \(B, 7\)"):
        local_lipschitz(m, torch.rand(2, 7, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="model.float"):
        local_lipschitz(m, X.float(), 0.1)
    with pytest.raises(ValueError, match=r"unsupported layer Tanh at 1\.0.*supports: .*nn\.Linear"):
        local_lipschitz(nn.Sequential(nn.Flatten(), nn.Sequential(nn.Tanh())).double(), X, 0.1)
    bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)).double()
    with pytest.raises(ValueError, match="training mode"):
        local_lipschitz(bn, X, 0.1)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        certify_lipschitz(m, X, torch.tensor([0, 3]), 0.1)
    with pytest.raises(ValueError, match="integer class"):
        certify_lipschitz(m, X, torch.tensor([0.0, 1.0]), 0.1)
    with pytest.raises(ValueError, match="max_leaves"):
        local_lipschitz(m, X, 0.1, options=dict(max_leaves=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_spec(dtype):
    m = small(dtype)
    x = X.to(dtype)
    for method in ("global", "elementwise", "local"):
        L = local_lipschitz(m, x, 0.05, 2, method)
        assert L.shape == (2, 3) and L.dtype == dtype and torch.isfinite(L).all() and (L > 0).all()
    # a spec row is a linear combination: its Lipschitz bound is at most the combination's
    C = torch.tensor([[[1.0, -1.0, 0.0], [2.0, 0.0, 0.0]]] * 2, dtype=dtype)
    Lc = local_lipschitz(m, x, 0.05, math.inf, "local", C)
    Li = local_lipschitz(m, x, 0.05, math.inf, "local")
    assert Lc.shape == (2, 2)
    assert torch.allclose(Lc[:, 1], 2 * Li[:, 0], rtol=1e-4 if dtype == torch.float32 else 1e-9)
    cert, low = certify_lipschitz(m, x, torch.tensor([0, 1]), 0.05)
    assert cert.dtype == torch.bool and cert.shape == (2,) and low.shape == (2,)
    assert torch.equal(cert, low > 0)


def test_nested_sequential_equals_flat():
    m = small()
    nested = nn.Sequential(m[0], nn.Sequential(m[1], nn.Sequential(m[2])), nn.Identity(), m[3])
    assert len(flatten_model(nested)) == 5
    a = local_lipschitz(m, X, 0.05)
    b = local_lipschitz(nested, X, 0.05)
    assert torch.allclose(a, b, rtol=1e-12)


def test_monotone_fallback_warns_and_stays_sound():
    torch.manual_seed(1)
    cell = MonLinear(10, m=0.2)
    with torch.no_grad():
        cell.A.mul_(3.0)
    m = small(cell=cell)
    m[2] = DEQ(cell, solver="peaceman_rachford", tol=1e-10, max_iter=2000)
    with pytest.warns(LipschitzFallbackWarning, match="rho\\(Dbar \\|W\\|\\) < 1"):
        r = lipschitz_report(m, X, 0.5, math.inf, "local")
    assert "lipschitz" in r.info["deq_boxes"]  # the interval proof failed: l2 Lipschitz box used
    assert torch.equal(r.bound, torch.minimum(r.raw["global"], r.bound))
    with pytest.raises(RuntimeError, match="looser bound"):
        local_lipschitz(m, X, 0.5, options=dict(on_fallback="raise"))


@pytest.mark.parametrize("cell", [IBPMonLinear(7, m=0.3, similarity=True), MonLinear(7, m=0.4),
                                  OrthoLinear(7, margin=0.25)])
def test_deq_closed_form_dominates_dense_jacobians(cell):
    """||(I - D W)^-1 D||_p <= the closed form, for random 0/1 and fractional D."""
    torch.manual_seed(3)
    cell = cell.double()
    if hasattr(cell, "s"):
        with torch.no_grad():
            cell.s.normal_()
    layer = flatten_model(DEQ(cell))[0]
    W = cell.operator().dense().detach()
    like = torch.zeros(1, dtype=torch.float64)
    b2, _ = deq_opnorm(layer, (7,), 2, like)
    binf, _ = deq_opnorm(layer, (7,), math.inf, like)
    for _ in range(200):
        d = torch.rand(7, dtype=torch.float64)
        d = torch.where(torch.rand(7) < 0.5, d.round(), d)
        J = torch.linalg.solve(torch.eye(7, dtype=torch.float64) - d[:, None] * W, torch.diag(d))
        assert torch.linalg.matrix_norm(J, 2) <= b2 * (1 + 1e-12)
        assert torch.linalg.matrix_norm(J, math.inf) <= binf * (1 + 1e-12)


def test_neumann_proofs_against_dense_solves():
    torch.manual_seed(0)
    n = 9
    W = torch.randn(n, n, dtype=torch.float64)
    W = 0.8 * W / torch.linalg.eigvals(W.abs()).abs().max()  # rho(|W|) = 0.8
    op = MatrixOperator(W)
    dbar = (torch.rand(2, n) < 0.7).to(torch.float64)
    A = NonnegOp(op, dbar, (n,))
    v, ok = rho_direction(A)
    assert ok.all() and (v >= 1).all()
    b = torch.rand(6, n, dtype=torch.float64)  # 3 rows per sample
    M, okM = neumann_bound(A, b, v)
    assert okM.all()
    for i in range(6):
        Ad = dbar[i // 3][:, None] * W.abs().T
        exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - Ad, b[i])
        assert (M[i] >= exact).all() and (M[i] <= exact * (1 + 1e-8) + 1e-12).all()
    # rho(|W|) > 1 with every neuron possibly active: no proof, rows marked
    A2 = NonnegOp(MatrixOperator(1.5 * W / 0.8), torch.ones(1, n, dtype=torch.float64), (n,))
    v2, ok2 = rho_direction(A2)
    assert not ok2.any()


@pytest.mark.parametrize("k,max_leaves", [(4, 4096), (7, 64), (6, 8), (5, 1)])
def test_leaf_bound_vs_brute_force(k, max_leaves):
    """A finished branch and bound equals the vertex maximum; a partial one bounds every point of
    the cube (vertices and random interior relu' values)."""
    torch.manual_seed(k)
    P = torch.randn(k, k, dtype=torch.float64)
    P = 0.6 * P / torch.linalg.eigvals(P.abs()).abs().max()
    w0, g0, G = torch.randn(3, k, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64), \
        torch.randn(k, 11, dtype=torch.float64)
    V, amax, leaves = leaf_bound(w0, P, g0, G, math.inf, max_leaves=max_leaves)
    pts = [torch.tensor(p, dtype=torch.float64) for p in itertools.product([0.0, 1.0], repeat=k)]
    pts += list(torch.rand(300, k, dtype=torch.float64))
    best = torch.zeros(3, dtype=torch.float64)
    for d in pts:
        alpha = torch.linalg.solve(torch.eye(k, dtype=torch.float64) - d[:, None] * P, (d * w0).T).T
        best = torch.maximum(best, (g0 + alpha @ G).abs().sum(1))
        assert (alpha.abs() <= amax * (1 + 1e-9) + 1e-12).all()
    assert (V >= best * (1 - 1e-12)).all()
    if max_leaves >= 4 ** k:  # budget enough to finish the branch and bound: exact
        assert torch.allclose(V, best, rtol=1e-10)


def test_device_and_eps_zero():
    m = small()
    L0 = local_lipschitz(m, X, 0.0)
    assert L0.device == X.device and torch.isfinite(L0).all()
    # eps = 0: the ball is the point; the local bound is the gradient norm there (linear region)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = lipschitz_report(m, X, 0.0)
    assert sum(r.info["unstable"]) == 0
