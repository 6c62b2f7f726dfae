"""The interval fixed point is PROVED, not just iterated: ``prove_interval_fixed_point`` returns a
box only when the post-fixpoint check F(B) ⊆ B passes (else IntervalProofError), and the returned
box contains the true fixed points; cells whose interval system does not contract (rho(|W|) > 1)
are rejected with a message pointing to IBPMon cells / CROWN. Also: implicit gradients of an IBP
margin loss match central finite differences, and option / unsupported-use errors.
"""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedParameter, BoundedTensor, PerturbationLpNorm

import lirpa_deq.bounds.interval as interval_mod
from lirpa_deq.bounds import (IntervalOptions, IntervalProofError, interval_step,
                              prove_interval_fixed_point)
from lirpa_deq.nn import DEQ, IBPMonConv2d, IBPMonLinear, MonLinear, OrthoLinear
from lirpa_deq.testing import assert_sound

F64 = torch.float64



def ball(x, eps):
    return BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))


def tight_fixed_points(cell, u):
    """z*(u) solved to 1e-13 (float64) by plain iteration (a contraction for IBPMon cells)."""
    deq = DEQ(cell, solver="fixed_point_iter", tol=1e-13, max_iter=2000, on_nonconvergence="raise")
    with torch.no_grad():
        return deq(u)


def sampled_injections(u_lo, u_hi, n=64):
    g = torch.Generator().manual_seed(0)
    t = torch.rand((n, *u_lo.shape), generator=g, dtype=u_lo.dtype)
    t[: n // 2] = t[: n // 2].round()  # box vertices too
    return (u_lo + t * (u_hi - u_lo)).reshape(-1, *u_lo.shape[1:])


def assert_box_contains_fixed_points(cell, lo, hi, u_lo, u_hi, atol=1e-10, rtol=0.0):
    # z* is solved to a relative residual of 1e-13 (error ~1e-12 |z| for a 0.5-contraction): with
    # |z| = O(1), atol 1e-10; states of size |z| >> 1 need rtol as well
    us = sampled_injections(u_lo, u_hi)
    z = tight_fixed_points(cell, us).reshape(-1, *lo.shape)
    tol = atol + rtol * z.abs()
    assert (z >= lo - tol).all() and (z <= hi + tol).all(), float(torch.maximum(lo - z, z - hi).max())


# ---------------------------------------------------------------------------- the proof
def small_problem(seed=0, n=12, eps=0.05):
    torch.manual_seed(seed)
    cell = IBPMonLinear(n, similarity=True).to(F64)
    with torch.no_grad():
        cell.s.normal_(0, 1.0)
    u = torch.randn(3, n, dtype=F64)  # mixed signs: some units inactive, some active
    return cell, u - eps, u + eps


def test_proved_box_contains_the_fixed_points_even_from_a_crude_search():
    """max_iter=1, retries=0, inflate_abs=0: the box found is far from the fixed point, but the
    inflation along (I - |W|)^-1 1 by twice the residual makes it a post-fixpoint (sound, loose)."""
    cell, u_lo, u_hi = small_problem()
    op = cell.operator()
    crude = IntervalOptions(max_iter=1, retries=0, inflate_abs=0.0, tighten_steps=0)
    lo, hi, info = prove_interval_fixed_point(op, u_lo, u_hi, opts=crude)
    assert info["attempts"] == 1
    assert_box_contains_fixed_points(cell, lo, hi, u_lo, u_hi)
    # the proved box is a post-fixpoint itself: one more step stays inside
    a, b = interval_step(op, lo, hi, u_lo, u_hi)
    assert (a >= lo - 1e-12).all() and (b <= hi + 1e-12).all()
    # the default (tight) search gives a much narrower box, also containing the fixed points
    tlo, thi, _ = prove_interval_fixed_point(op, u_lo, u_hi)
    assert_box_contains_fixed_points(cell, tlo, thi, u_lo, u_hi)
    assert float((thi - tlo).sum()) < float((hi - lo).sum())


@pytest.mark.parametrize("retries", [0, 2])
def test_proof_rejects_a_box_that_is_not_a_post_fixpoint(monkeypatch, retries):
    """Remove the inflation (zero direction, inflate_abs=0): the box after one search step is not a
    post-fixpoint, the check must fail and IntervalProofError must be raised (no box returned)."""
    cell, u_lo, u_hi = small_problem(seed=1)
    op = cell.operator()
    opts = IntervalOptions(max_iter=1, retries=retries, inflate_abs=0.0, inflate_rel=0.0)
    # the box the proof will check: what the (one-step) search returns from z_start = 0
    z0 = torch.zeros_like(u_lo)
    lo, hi, _ = interval_mod._search(op, z0, z0, u_lo, u_hi, opts)
    a, b = interval_step(op, lo, hi, u_lo, u_hi)
    assert bool((a < lo).any() or (b > hi).any()), "test set-up: this box must NOT be a post-fixpoint"

    calls = []

    def zero_direction(op_, shape, like, **kw):
        calls.append(shape)
        # zero inflation direction with unit margin: no inflation at all
        return torch.zeros((1, *shape), dtype=like.dtype), torch.ones((1, *shape), dtype=like.dtype)

    monkeypatch.setattr(interval_mod, "neumann_direction", zero_direction)
    with pytest.raises(IntervalProofError, match=r"could not prove an interval fixed point"):
        prove_interval_fixed_point(op, u_lo, u_hi, z_start=z0, opts=opts)
    assert calls == [(12,)]


def test_proof_rejects_a_too_narrow_box(monkeypatch):
    """If the search 'converged' to a box narrower than the truth (a solver bug, a loose tolerance),
    returning it would be unsound. With the inflation switched off, the check must reject it."""
    cell, u_lo, u_hi = small_problem(seed=2, eps=0.1)
    op = cell.operator()
    lo, hi, _ = prove_interval_fixed_point(op, u_lo, u_hi)
    shrink = 0.3 * (hi - lo)
    n_lo, n_hi = lo + shrink, hi - shrink
    # returning [n_lo, n_hi] would be unsound: some true fixed points lie outside it
    z = tight_fixed_points(cell, sampled_injections(u_lo, u_hi)).reshape(-1, *lo.shape)
    assert bool(((z < n_lo - 1e-6) | (z > n_hi + 1e-6)).any())

    stats = type("Stats", (), {"iterations": 0, "residual": 0.0})()
    monkeypatch.setattr(interval_mod, "_search", lambda *a: (n_lo.clone(), n_hi.clone(), stats))
    monkeypatch.setattr(interval_mod, "neumann_direction",
                        lambda op_, shape, like, **k: (torch.zeros((1, *shape), dtype=like.dtype),
                                                       torch.ones((1, *shape), dtype=like.dtype)))
    opts = IntervalOptions(retries=3, inflate_abs=0.0, inflate_rel=0.0)
    with pytest.raises(IntervalProofError):
        prove_interval_fixed_point(op, u_lo, u_hi, opts=opts)


@pytest.mark.parametrize("cell_cls", [MonLinear, OrthoLinear])
def test_cells_with_rho_abs_w_above_one_raise_with_advice(cell_cls):
    torch.manual_seed(0)
    cell = cell_cls(16).to(F64)
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(2.0)
    op = cell.operator()
    rho = float(torch.linalg.eigvals(op.dense().detach().abs()).abs().max())
    assert rho > 1.5  # precondition: plain interval iteration diverges
    u = torch.randn(2, 16, dtype=F64)
    with pytest.raises(IntervalProofError) as err:
        prove_interval_fixed_point(op, u - 0.01, u + 0.01)
    assert "CROWN" in str(err.value) and "IBPMon" in str(err.value)

    # the same through auto_LiRPA with the fallback off: no bound is returned
    model = nn.Sequential(nn.Linear(8, 16), DEQ(cell, solver="peaceman_rachford", tol=1e-10, max_iter=1000),
                          nn.Linear(16, 3)).to(F64)
    x = torch.rand(2, 8, dtype=F64)
    strict = BoundedModule(model, x, bound_opts={"deq": {"fallback": False}})
    with pytest.raises(IntervalProofError, match="CROWN"):
        strict.compute_bounds(x=(ball(x, 0.01),), method="IBP")
    # default: the looser monotone-ball box is used instead, and it is sound
    bm = BoundedModule(model, x)
    lb, ub = bm.compute_bounds(x=(ball(x, 0.01),), method="IBP")
    node = next(m for m in bm._modules.values() if type(m).__name__ == "BoundDEQ")
    assert node.box_info["box"] == "monotone-ball" and "CROWN" in node.box_info["interval_error"]
    # the point solve stops at a relative residual of 1e-10 (error ~1e-10 / m): atol 1e-8
    assert_sound(model, x, 0.01, lb.detach(), ub.detach(), n_samples=64, pgd_steps=10, atol=1e-8)


# ------------------------------------------------------------------------------ gradients
def fd_models():
    torch.manual_seed(0)
    fc = nn.Sequential(nn.Flatten(), nn.Linear(16, 10),
                       DEQ(IBPMonLinear(10, similarity=True), solver="fixed_point_iter", tol=1e-12, max_iter=500),
                       nn.Linear(10, 4)).to(F64)
    conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                         DEQ(IBPMonConv2d(3, similarity=True), solver="fixed_point_iter", tol=1e-12, max_iter=500),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).to(F64)
    for m in (fc, conv):
        with torch.no_grad():
            for mod in m.modules():
                if hasattr(mod, "s") and isinstance(mod.s, nn.Parameter):
                    mod.s.normal_(0, 0.5)
    return {"fc": (fc, torch.rand(3, 1, 4, 4, dtype=F64)), "conv": (conv, torch.rand(2, 1, 6, 6, dtype=F64))}


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_ibp_margin_loss_gradient_matches_finite_differences(kind):
    model, x = fd_models()[kind]
    labels = torch.arange(x.shape[0]) % 4
    eye = torch.eye(4, dtype=F64)
    C = torch.stack([eye[y].unsqueeze(0) - eye[[j for j in range(4) if j != y]] for y in labels.tolist()])
    # tight search and tiny inflation: the bound is then a smooth function of the weights up to ~1e-12
    bm = BoundedModule(model, x, bound_opts={"deq": {"tol": 1e-12, "max_iter": 500, "inflate_abs": 1e-12}})
    bx = ball(x, 0.05)

    def loss():  # IBP certified-training loss: cross-entropy of the negated margin lower bounds
        lb, _ = bm.compute_bounds(x=(bx,), C=C, method="IBP", bound_upper=False)
        logits = torch.cat([torch.zeros_like(lb[:, :1]), -lb], 1)
        return nn.functional.cross_entropy(logits, torch.zeros(lb.shape[0], dtype=torch.long))

    params = dict(bm.named_parameters())
    cell_names = [n for n in params if ".cell." in n]
    assert {n.rsplit(".", 1)[1] for n in cell_names} == {"M", "s"}
    assert len(params) == 6  # Linear/Conv before, cell M and s, Linear after
    for p in params.values():
        p.grad = None
    loss().backward()
    h = 1e-6
    g = torch.Generator().manual_seed(1)
    for name, p in params.items():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
        d = torch.randn(p.shape, generator=g, dtype=F64)
        analytic = float((p.grad * d).sum())
        with torch.no_grad():  # in place, as an optimizer would (the node's box cache must notice)
            p.add_(h * d)
            up = float(loss())
            p.sub_(2 * h * d)
            down = float(loss())
            p.add_(h * d)
        fd = (up - down) / (2 * h)
        assert abs(analytic - fd) <= 1e-4 * abs(fd) + 1e-9, (name, analytic, fd)


def test_one_step_gradient_would_fail_the_check():
    """The finite-difference test above can fail: the gradient of ONE interval step (no implicit
    correction) differs from the finite difference by far more than the tolerance."""
    from lirpa_deq.bounds.interval import prove_interval_fixed_point as prove

    cell, u_lo, u_hi = small_problem(seed=3, eps=0.1)
    opts = IntervalOptions(tol=1e-12, max_iter=500, inflate_abs=1e-12)

    def hi_sum(M, implicit):
        lo, hi, _ = prove(cell.operator({"M": M.detach()}), u_lo, u_hi, opts=opts)
        # a fresh operator for the differentiable step: MatrixOperator caches |W| on first use, and
        # one built under prove()'s no_grad would carry no gradient through |W| (as BoundDEQ does)
        op = cell.operator({"M": M})
        if implicit:
            from lirpa_deq.bounds.implicit import differentiable_interval_step
            return differentiable_interval_step(op, lo, hi, u_lo, u_hi)[1].sum()
        return interval_step(op, lo, hi, u_lo, u_hi)[1].sum()

    M = cell.M.detach().clone().requires_grad_(True)
    d = torch.randn_like(M)
    g_imp = float((torch.autograd.grad(hi_sum(M, True), M)[0] * d).sum())
    g_one = float((torch.autograd.grad(hi_sum(M, False), M)[0] * d).sum())
    h = 1e-6
    with torch.no_grad():
        fd = (float(hi_sum(M + h * d, False)) - float(hi_sum(M - h * d, False))) / (2 * h)
    assert abs(g_imp - fd) <= 1e-4 * abs(fd) + 1e-9, (g_imp, fd)
    assert abs(g_one - fd) > 1e-2 * abs(fd), (g_one, fd)


# -------------------------------------------------------------------- options and errors
def fc_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), DEQ(IBPMonLinear(8), tol=1e-10, max_iter=300),
                         nn.Linear(8, 3)).to(F64)


def test_unknown_deq_option_is_rejected():
    x = torch.rand(2, 1, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"unknown bound_opts\['deq'\] option.*'tolerance'"):
        BoundedModule(fc_model(), x, bound_opts={"deq": {"tolerance": 1e-6}})
    with pytest.raises(ValueError, match="inflate_abs"):
        BoundedModule(fc_model(), x, bound_opts={"deq": {"inflate_abs": -1.0}})


def test_perturbed_cell_weights_are_not_supported():
    model = fc_model()
    cell = model[2].cell
    cell.M = BoundedParameter(cell.M.detach().clone(), PerturbationLpNorm(norm=math.inf, eps=0.01))
    x = torch.rand(2, 1, 4, 4, dtype=F64)
    bm = BoundedModule(model, x)
    with pytest.raises(NotImplementedError, match="perturbed DEQ cell parameters are not supported"):
        bm.compute_bounds(x=(ball(x, 0.1),), method="IBP")


# ------------------------------------------------ regressions (bugs found by these tests, fixed)
def test_inplace_weight_update_gives_fresh_sound_bounds():
    model = fc_model()
    x = torch.rand(3, 1, 4, 4, dtype=F64)
    bm = BoundedModule(model, x)
    bm.compute_bounds(x=(ball(x, 1e-4),), method="IBP")
    with torch.no_grad():  # what optimizer.step() or load_state_dict() do: in-place writes
        model[2].cell.M.copy_(torch.randn(8, 8, dtype=F64))
    lb, ub = bm.compute_bounds(x=(ball(x, 1e-4),), method="IBP")
    flb, fub = BoundedModule(model, x).compute_bounds(x=(ball(x, 1e-4),), method="IBP")
    # a tol=1e-10 point solve is within ~1e-9 of the true outputs: atol 1e-8
    assert_sound(model, x, 1e-4, lb.detach(), ub.detach(), n_samples=32, pgd_steps=5, atol=1e-8)
    torch.testing.assert_close(lb, flb, rtol=0, atol=1e-7)


def test_splitting_solver_option_is_rejected_early_or_works():
    model, x = fc_model(), torch.rand(2, 1, 4, 4, dtype=F64)
    try:
        bm = BoundedModule(model, x, bound_opts={"deq": {"solver": "peaceman_rachford"}})
    except ValueError:
        return
    lb, ub = bm.compute_bounds(x=(ball(x, 0.1),), method="IBP")
    y = model(x)
    assert (lb <= y + 1e-8).all() and (y <= ub + 1e-8).all()


def test_ibpmon_with_wide_similarity_is_proved():
    torch.manual_seed(0)
    cell = IBPMonLinear(8, similarity=True).to(F64)
    with torch.no_grad():
        cell.s.copy_(torch.linspace(-12, 12, 8))
    op = cell.operator()
    assert float(torch.linalg.eigvals(op.dense().detach().abs()).abs().max()) < 0.5
    u = torch.rand(2, 8, dtype=F64)
    lo, hi, _ = prove_interval_fixed_point(op, u - 0.01, u + 0.01)
    assert_box_contains_fixed_points(cell, lo, hi, u - 0.01, u + 0.01, atol=1e-10, rtol=1e-10)  # |z| ~ 1e9
