"""IBP through DEQ layers (one ``custom::DEQFixedPoint`` node per layer, ``BoundDEQ``): the bounds
contain every output we can find (samples, vertices, PGD) on random IBP-MonDEQ models, they certify
the TRUE fixed point (not the solver's approximation), they work with several DEQ nodes, margin
specifications ``C``, the ``bound_lower``/``bound_upper`` flags, batch sizes, float32/float64 and an
explicit ``custom_ops`` registration, and they shrink linearly to the point solution as eps -> 0.

Tolerances. The model outputs we compare against come from the DEQ's point solve, which stops at a
relative residual ``||T(z) - z|| <= tol ||z||``. For these cells ``I - W`` is strongly monotone with
m = 0.5 (rho(|W|) <= 0.5 as well), so the distance to the true fixed point is at most a few times
``tol * ||z||``; the final Linear (norm O(1)) carries that to the outputs, and ``||z||`` stays
O(1..10) for inputs in [0, 1] and eps <= 1. Containment is therefore checked with
``atol = 100 * tol * (1 + max|bound|)`` (float64: tol 1e-10; float32: tol 1e-6 plus float32
rounding of the forward pass, ~1e-6 relative, which the same formula covers). The bounds
themselves are proved with their own rounding slack, so no extra allowance is needed for them.
"""
import copy
import gc
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

import lirpa_deq
from lirpa_deq.bounds import OP_NAME, BoundDEQ
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear
from lirpa_deq.testing import assert_sound, check_bounds

SOLVE_TOL = {torch.float32: 1e-6, torch.float64: 1e-10}
EPS_GRID = (1e-4, 1e-2, 0.1, 1.0)
# rho(|W|) <= 1 - m = 0.5 makes z -> relu(W z + u) a contraction in a weighted max-norm, so plain
# iteration converges (~35 steps to 1e-10) and is much cheaper than Anderson's small batched
# solves inside the PGD loops. The interval search inside BoundDEQ keeps its default (Anderson).
POINT_SOLVER = "fixed_point_iter"


def containment_atol(dtype, lb, ub):
    """See the module docstring: 100 x the DEQ solve tolerance, relative to the output scale."""
    scale = max(float(lb.detach().abs().max()), float(ub.detach().abs().max()))
    return 100 * SOLVE_TOL[dtype] * (1 + scale)


def fc_model(n=10, n_in=16, n_out=5, *, similarity=False, relu=False, dtype=torch.float64, **deq_kw):
    deq_kw = {"tol": SOLVE_TOL[dtype], "max_iter": 500, "solver": POINT_SOLVER, **deq_kw}
    layers = [nn.Flatten(), nn.Linear(n_in, n), DEQ(IBPMonLinear(n, similarity=similarity), **deq_kw)]
    if relu:
        layers.append(nn.ReLU())
    layers.append(nn.Linear(n, n_out))
    return nn.Sequential(*layers).to(dtype)


def conv_model(channels=3, *, similarity=False, bn=False, relu=False, dtype=torch.float64, hw=8):
    layers = [nn.Conv2d(1, channels, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(channels))
    layers.append(DEQ(IBPMonConv2d(channels, similarity=similarity), tol=SOLVE_TOL[dtype], max_iter=500,
                      solver=POINT_SOLVER))
    if relu:
        layers.append(nn.ReLU())
    layers += [nn.AvgPool2d(4), nn.Flatten(), nn.Linear(channels * (hw // 4) ** 2, 5)]
    model = nn.Sequential(*layers).to(dtype)
    if bn:  # give BatchNorm non-trivial running statistics, then freeze it (eval)
        model.train()
        with torch.no_grad():
            model(torch.rand(32, 1, hw, hw, dtype=dtype))
    return model.eval()


def randomise_similarity(model, std):
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (IBPMonLinear, IBPMonConv2d)) and mod.similarity:
                mod.s.normal_(0, std)


def ball(x, eps):
    return BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))


def ibp(bm, x, eps, **kw):
    return bm.compute_bounds(x=(ball(x, eps),), method="IBP", **kw)


def assert_interval_proof_used(bm):
    """IBP-Mon cells must get the interval post-fixpoint, not a fallback box (when one exists)."""
    nodes = [m for m in bm._modules.values() if isinstance(m, BoundDEQ)]
    assert nodes
    for node in nodes:
        assert node.box_info.get("box", "interval-post-fixpoint") == "interval-post-fixpoint", node.box_info


def check_sound_over_eps(model, x, bm, eps_grid=EPS_GRID, f=None, n_samples=96, pgd_steps=15):
    """assert_sound at every eps of the grid; returns the mean widths (which must grow with eps)."""
    dtype = x.dtype
    widths = []
    for eps in eps_grid:
        lb, ub = ibp(bm, x, eps)
        lb, ub = lb.detach(), ub.detach()
        assert lb.shape == ub.shape == (x.shape[0], 5)
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
        assert (lb <= ub).all()
        report = assert_sound(f or model, x, eps, lb, ub, n_samples=n_samples, pgd_steps=pgd_steps,
                              atol=containment_atol(dtype, lb, ub))
        assert report.violations == 0 and report.points > n_samples * x.shape[0]
        widths.append(float((ub - lb).mean()))
        assert_interval_proof_used(bm)
    assert all(a < b for a, b in zip(widths, widths[1:])), widths
    return widths


# ------------------------------------------------------------------------------ soundness
FC_CASES = [  # seed, n, dtype, similarity, relu-after-DEQ, point solver
    (0, 8, torch.float64, False, False, POINT_SOLVER),
    (1, 13, torch.float64, True, True, POINT_SOLVER),
    (2, 32, torch.float64, True, False, "anderson"),  # the DEQ's default solver
    (3, 4, torch.float64, False, True, POINT_SOLVER),
    (4, 10, torch.float32, False, True, POINT_SOLVER),
    (5, 6, torch.float32, True, False, POINT_SOLVER),
    (6, 24, torch.float32, True, True, "anderson"),
]


@pytest.mark.parametrize("seed,n,dtype,similarity,relu,solver", FC_CASES)
def test_fc_ibp_mondeq_bounds_are_sound(seed, n, dtype, similarity, relu, solver):
    torch.manual_seed(seed)
    model = fc_model(n, similarity=similarity, relu=relu, dtype=dtype, solver=solver)
    randomise_similarity(model, 1.0)
    x = torch.rand(3, 1, 4, 4, dtype=dtype)
    bm = BoundedModule(model, x)
    assert sum(isinstance(m, BoundDEQ) for m in bm._modules.values()) == 1
    check_sound_over_eps(model, x, bm)


CONV_CASES = [  # seed, channels, dtype, similarity, BatchNorm before, relu after
    (0, 3, torch.float64, False, True, False),
    (1, 2, torch.float64, True, True, True),
    (2, 3, torch.float32, True, False, True),
    (3, 4, torch.float32, False, True, False),
    (4, 2, torch.float64, True, False, True),
]


@pytest.mark.parametrize("seed,channels,dtype,similarity,bn,relu", CONV_CASES)
def test_conv_ibp_mondeq_bounds_are_sound(seed, channels, dtype, similarity, bn, relu):
    torch.manual_seed(seed)
    model = conv_model(channels, similarity=similarity, bn=bn, relu=relu, dtype=dtype)
    randomise_similarity(model, 1.0)
    x = torch.rand(2, 1, 8, 8, dtype=dtype)
    bm = BoundedModule(model, x)
    check_sound_over_eps(model, x, bm, eps_grid=(1e-4, 1e-2, 0.1, 1.0), n_samples=48, pgd_steps=10)


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_ibp_is_exact_for_nonnegative_weights(kind):
    """With W >= 0 and nonnegative weights before the DEQ, z*(x) is monotone in x, so the exact
    range over the ball is [z*(x - eps), z*(x + eps)] -- and so is the interval fixed point (|W| = W).
    The bounds must equal it up to the proof's tiny inflation: this catches an over- AND an
    under-approximating interval step, which sampling alone may miss."""
    torch.manual_seed(7)
    if kind == "fc":
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10),
                              DEQ(IBPMonLinear(10, similarity=True), tol=1e-13, max_iter=500,
                                  solver=POINT_SOLVER)).to(torch.float64)
        x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                              DEQ(IBPMonConv2d(3, similarity=True), tol=1e-13, max_iter=500,
                                  solver=POINT_SOLVER), nn.Flatten()).to(torch.float64)
        x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    randomise_similarity(model, 1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    bm = BoundedModule(model, x, bound_opts={"deq": {"tol": 1e-12, "inflate_abs": 1e-14}})
    for eps in (0.01, 0.3):
        lb, ub = ibp(bm, x, eps)
        lo_true, hi_true = model(x - eps).detach(), model(x + eps).detach()
        assert float((hi_true - lo_true).max()) > eps  # a real range, not a constant
        # solves to 1e-13 relative and an inflation of 1e-14: exact to 1e-9
        torch.testing.assert_close(lb, lo_true, rtol=0, atol=1e-9)
        torch.testing.assert_close(ub, hi_true, rtol=0, atol=1e-9)


def test_adversarially_scaled_weights_stay_sound():
    """Raw M x 100 (W is invariant to scaling M, so the bounds must not move), the Linear before the
    DEQ x 100 (injections of size ~100) and a similarity spread of e^+-3 (|W| entries up to ~1e3):
    float32 bounds must contain the outputs of a float64, tightly solved copy of the same weights."""
    torch.manual_seed(5)
    base = fc_model(12, similarity=True, dtype=torch.float32)
    with torch.no_grad():
        base[2].cell.s.copy_(torch.linspace(-3, 3, 12)[torch.randperm(12)])
    scaled = copy.deepcopy(base)
    with torch.no_grad():
        scaled[2].cell.M.mul_(100)
    x = torch.rand(3, 1, 4, 4)
    lb0, ub0 = ibp(BoundedModule(base, x), x, 0.1)
    bm = BoundedModule(scaled, x)
    lb1, ub1 = ibp(bm, x, 0.1)
    torch.testing.assert_close(lb1, lb0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ub1, ub0, rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        scaled[1].weight.mul_(100)
        scaled[1].bias.mul_(100)
    ref = copy.deepcopy(scaled).double()  # the same (float32-representable) weights, solved tightly
    ref[2].tol, ref[2].max_iter = 1e-12, 2000
    bm = BoundedModule(scaled, x)
    for eps in (1e-4, 0.1, 1.0):
        lb, ub = ibp(bm, x, eps)
        assert float(ub.detach().abs().max()) > 10  # large outputs (unit-scale weights give ~0.5)
        # float32 W vs its float64 re-computation differ by ~1e-7 relative: rtol covers that
        report = check_bounds(lambda z: ref(z.double()), x.double(), eps, lb.double().detach(),
                              ub.double().detach(), n_samples=48, pgd_steps=8, atol=1e-6, rtol=1e-5)
        assert report.violations == 0, f"UNSOUND bounds: {report}"


def test_bounds_certify_true_fixed_point_not_the_truncated_solve():
    """DEQ(max_iter=2) returns an inaccurate z; the node must still bound the TRUE fixed point, i.e.
    the outputs of a tightly solved copy of the same weights (and give the same bounds as it)."""
    torch.manual_seed(1)
    ref = fc_model(10, dtype=torch.float64, tol=1e-12)
    bad = copy.deepcopy(ref)
    bad[2].max_iter, bad[2].on_nonconvergence = 2, "ignore"
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    gap = float((bad(x) - ref(x)).detach().abs().max())
    assert gap > 1e-5  # the truncated solve really is off
    bm_bad, bm_ref = BoundedModule(bad, x), BoundedModule(ref, x)
    for eps in (1e-6, 1e-2, 1.0):
        lb, ub = ibp(bm_bad, x, eps)
        lr, ur = ibp(bm_ref, x, eps)
        # both boxes are proved; they may differ by what the interval search (tol 1e-4, warm-started
        # from each model's own forward value) leaves to the inflation: a few 1e-6 here
        torch.testing.assert_close(lb, lr, rtol=0, atol=2e-5)
        torch.testing.assert_close(ub, ur, rtol=0, atol=2e-5)
        assert_sound(ref, x, eps, lb.detach(), ub.detach(), n_samples=48, pgd_steps=8, atol=1e-9)
        if eps == 1e-6:  # boxes narrower than the solver error: the truncated output falls outside
            assert float((ub - lb).max()) < gap / 5
            y = bad(x)
            assert bool(((y < lb) | (y > ub)).any())


def test_two_deq_layers_give_two_nodes_and_sound_bounds():
    torch.manual_seed(2)
    dt = torch.float64
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), DEQ(IBPMonLinear(10), tol=1e-10, max_iter=500,
                                                             solver=POINT_SOLVER),
                          nn.Linear(10, 7), DEQ(IBPMonLinear(7, similarity=True), tol=1e-10, max_iter=500,
                                                solver=POINT_SOLVER),
                          nn.ReLU(), nn.Linear(7, 5)).to(dt)
    randomise_similarity(model, 1.0)
    x = torch.rand(4, 1, 4, 4, dtype=dt)
    bm = BoundedModule(model, x)
    nodes = [m for m in bm._modules.values() if isinstance(m, BoundDEQ)]
    assert len(nodes) == 2
    assert nodes[0].deq is model[2] and nodes[1].deq is model[4]
    check_sound_over_eps(model, x, bm, eps_grid=(1e-3, 0.1, 1.0))
    lo, hi = nodes[1].box  # the proved box of the second layer's fixed point
    assert lo.shape == hi.shape == (4, 7) and (lo <= hi).all() and (lo >= 0).all()


# ------------------------------------------------------------------- specification / flags
def margin_C(labels, k, dtype):
    eye = torch.eye(k, dtype=dtype)
    return torch.stack([eye[y].unsqueeze(0) - eye[[j for j in range(k) if j != y]] for y in labels.tolist()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 5])
def test_margin_spec_flags_and_explicit_custom_ops(dtype, batch):
    torch.manual_seed(3)
    model = fc_model(9, dtype=dtype)
    x = torch.rand(batch, 1, 4, 4, dtype=dtype)
    labels = torch.arange(batch) % 5
    C = margin_C(labels, 5, dtype)  # rows e_y - e_j: the final Linear is folded into C
    eps = 0.05
    bm = BoundedModule(model, x)
    lb, ub = ibp(bm, x, eps, C=C)
    assert lb.shape == ub.shape == (batch, 4) and lb.dtype == dtype

    def margins(z):
        out = model(z)
        return torch.einsum("bkc,bc->bk", C.repeat(out.shape[0] // batch, 1, 1), out)

    assert_sound(margins, x, eps, lb.detach(), ub.detach(), n_samples=48, pgd_steps=8,
                 atol=containment_atol(dtype, lb, ub))
    # folding C into the last Linear beats subtracting the per-logit bounds (and is never worse)
    plb, pub = ibp(bm, x, eps)
    naive = torch.stack([plb[b, labels[b]] - pub[b, [j for j in range(5) if j != labels[b]]]
                         for b in range(batch)])
    assert (lb >= naive - 1e-6).all() and float((lb - naive).sum()) > 1e-3

    # IBP is two-sided by nature: auto_LiRPA accepts the one-sided flags and still returns both
    # bounds (unlike CROWN, which returns None); the requested side must be the same number.
    only_lb = ibp(bm, x, eps, C=C, bound_upper=False)
    only_ub = ibp(bm, x, eps, C=C, bound_lower=False)
    torch.testing.assert_close(only_lb[0], lb, rtol=0, atol=1e-6)
    torch.testing.assert_close(only_ub[1], ub, rtol=0, atol=1e-6)

    explicit = BoundedModule(model, x, custom_ops={OP_NAME: lirpa_deq.BoundDEQ})
    assert sum(isinstance(m, BoundDEQ) for m in explicit._modules.values()) == 1
    elb, eub = ibp(explicit, x, eps, C=C)
    torch.testing.assert_close(elb, lb, rtol=0, atol=1e-6)
    torch.testing.assert_close(eub, ub, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- eps -> 0
def test_bounds_shrink_linearly_to_the_point_solution():
    torch.manual_seed(4)
    model = fc_model(10, dtype=torch.float64, tol=1e-13)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    y = model(x).detach()
    bm = BoundedModule(model, x, bound_opts={"deq": {"tol": 1e-12, "inflate_abs": 1e-14}})
    lb, ub = ibp(bm, x, 0.0)
    # at eps = 0 the box is the fixed point up to the proof's inflation (~1e-13) and the solve error
    assert float((ub - lb).max()) < 1e-11
    assert float((lb - y).abs().max()) < 1e-10 and float((ub - y).abs().max()) < 1e-10
    ratios = []
    for eps in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        lb, ub = ibp(bm, x, eps)
        assert (lb <= y + 1e-10).all() and (y <= ub + 1e-10).all()
        ratios.append(float((ub - lb).max()) / eps)
    # no ReLU changes phase in this range, so the width is exactly linear in eps
    assert max(ratios) / min(ratios) < 1.01, ratios
    assert ratios[0] > 0.1  # a real, eps-proportional width (not collapsed to 0)

    # float32 with default options: still within float32 accuracy of the forward output
    model32 = copy.deepcopy(model).float()
    model32[2].tol = 1e-6
    x32 = x.float()
    lb, ub = ibp(BoundedModule(model32, x32), x32, 0.0)
    y32 = model32(x32).detach()
    assert float((ub - lb).max()) < 1e-4
    assert (lb <= y32 + 1e-5).all() and (y32 <= ub + 1e-5).all()


# ------------------------------------------------ regressions (bugs found by these tests, fixed)
def test_bounded_module_keeps_its_deq_layer_alive():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    bm = BoundedModule(fc_model(8), x)  # no other reference to the model
    gc.collect()
    lb, ub = ibp(bm, x, 0.1)
    assert (lb <= ub).all()
