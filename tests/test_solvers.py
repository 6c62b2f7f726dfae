"""Solvers: fixed points reached (per sample), agreement, warm starts, stats, registry, errors."""
import pytest
import torch

import lirpa_deq.nn as L
from lirpa_deq.solvers import (SOLVERS, MonotoneBounds, ReLUAffineProblem, SolverStats, anderson,
                               broyden, default_fb_alpha, default_pr_alpha, fb_rate,
                               fixed_point_iter, forward_backward, get_solver, peaceman_rachford,
                               pr_rate)
from lirpa_deq.solvers.splitting import _MonotoneForm
from lirpa_deq.solvers.steps import pr_alpha
from test_nn_common import CELL_IDS, CELL_SPECS, fixed_point_residual, make_cell, state_shape

SPEC = dict(zip(CELL_IDS, CELL_SPECS))
TOL = 1e-7
CONV_SMALL = (4, 8, 8)  # the brief's small conv case: 4 channels, 8x8


def problem_for(cell, batch, seed=0, conv_shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) + (conv_shape if conv_shape and not hasattr(cell, "n") else state_shape(cell, 1)[1:])
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    return ReLUAffineProblem(cell.operator(), u, margin=cell.margin), u


def conv4(cid, seed=0):
    """The cell of kind ``cid`` with 4 channels (for the 4x8x8 conv cases)."""
    cls = type(make_cell(SPEC[cid]))
    torch.manual_seed(seed)
    kw = {"similarity": True} if cid.endswith("-sim") else {}
    cell = cls(4, dtype=torch.float64, **kw)
    if kw:
        with torch.no_grad():
            cell.s.normal_(0, 0.5)
    return cell


def solve(name, prob, z0=None, **kw):
    z0 = torch.zeros_like(prob.bias) if z0 is None else z0
    with torch.no_grad():
        return get_solver(name)(prob, z0, **kw)


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("cid", CELL_IDS)
def test_fixed_point_reached_every_cell(cid, batch):
    conv = "Conv" in cid
    cell = conv4(cid) if conv else make_cell(SPEC[cid])
    prob, u = problem_for(cell, batch, conv_shape=CONV_SMALL)
    for name in ("peaceman_rachford", "anderson"):
        z, st = solve(name, prob, tol=TOL, max_iter=300)
        assert st.converged, (name, st)
        assert st.per_sample_residual.shape == (batch,)
        res = fixed_point_residual(cell, z, u)  # independent recomputation
        assert float(res.max()) <= TOL * 1.0001
        torch.testing.assert_close(res, st.per_sample_residual, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("cid", ["MonLinear", "IBPMonLinear-sim", "OrthoLinear", "MonConv2d",
                                 "IBPMonConv2d", "OrthoConv2d"])
def test_all_solvers_agree(cid):
    cell = conv4(cid) if "Conv" in cid else make_cell(SPEC[cid])
    prob, u = problem_for(cell, 8, seed=1, conv_shape=CONV_SMALL)
    names = list(SOLVERS)
    if cell.guarantee == "monotone":  # plain iteration need not converge for monotone W
        names.remove("fixed_point_iter")
    sols = {}
    for name in names:
        z, st = solve(name, prob, tol=1e-9, max_iter=3000)
        assert st.converged, (name, st)
        sols[name] = z
    ref = sols["peaceman_rachford"]
    for name, z in sols.items():
        torch.testing.assert_close(z, ref, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_warm_start_from_solution(name):
    cell = make_cell(SPEC["IBPMonLinear"])
    prob, u = problem_for(cell, 16)
    z_star, _ = solve("peaceman_rachford", prob, tol=1e-9, max_iter=200)
    _, st = solve(name, prob, z0=z_star, tol=1e-6, max_iter=50)
    assert st.converged and st.iterations <= 1
    # a nearby input (the serialized-smoothing situation) needs far fewer steps than a cold start
    near = ReLUAffineProblem(prob.op, u + 1e-3 * torch.randn_like(u), margin=cell.margin)
    _, warm = solve(name, near, z0=z_star, tol=1e-6, max_iter=200)
    _, cold = solve(name, near, tol=1e-6, max_iter=200)
    assert warm.converged and cold.converged
    assert warm.iterations < cold.iterations


def test_converged_samples_are_frozen_and_stats_honest():
    cell = make_cell(SPEC["MonLinear"])
    prob, u = problem_for(cell, 4)
    z_star, _ = solve("peaceman_rachford", prob, tol=1e-10, max_iter=500)
    z0 = z_star.clone()
    z0[2:] = 0  # samples 0, 1 start converged
    z, st = solve("anderson", prob, z0=z0, tol=1e-8, max_iter=100)
    assert torch.equal(z[:2], z_star[:2])
    assert st.converged and st.iterations > 0
    assert isinstance(st, SolverStats) and st.solver == "anderson" and st.tol == 1e-8
    assert st.residual == pytest.approx(float(st.per_sample_residual.max()))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_nonconvergence_is_reported(name):
    cell = make_cell(SPEC["MonLinear"], scale=1.0)
    prob, _ = problem_for(cell, 3)
    z, st = solve(name, prob, tol=1e-14, max_iter=1)
    assert not st.converged and st.iterations == 1
    res = fixed_point_residual(cell, z, prob.bias)
    torch.testing.assert_close(res, st.per_sample_residual, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("fn", [fixed_point_iter, anderson, broyden])
def test_generic_solvers_on_a_plain_map(fn):
    torch.manual_seed(0)
    b = torch.randn(5, 3, 2, dtype=torch.float64)
    f = lambda z: 0.5 * torch.cos(z) + b  # noqa: E731  (a contraction, not a DEQ cell)
    z, st = fn(f, torch.zeros_like(b), tol=1e-10, max_iter=200)
    assert st.converged
    torch.testing.assert_close(z, f(z), rtol=0, atol=1e-9)


@pytest.mark.parametrize("fn", [forward_backward, peaceman_rachford])
def test_splitting_solvers_need_the_problem(fn):
    with pytest.raises(TypeError, match="ReLUAffineProblem"):
        fn(lambda z: z, torch.zeros(2, 3))


def test_registry_and_unknown_names():
    assert set(SOLVERS) == {"anderson", "broyden", "fixed_point_iter", "forward_backward",
                            "peaceman_rachford"}
    assert get_solver("anderson") is anderson
    with pytest.raises(ValueError, match=r"unknown solver 'newton'.*anderson.*peaceman_rachford"):
        get_solver("newton")


@pytest.mark.parametrize("kw, match", [
    (dict(tol=-1.0), "tol must be"), (dict(max_iter=0), "max_iter must be"),
    (dict(max_iter=2.5), "max_iter must be")])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_bad_common_arguments(name, kw, match):
    prob, _ = problem_for(make_cell(SPEC["IBPMonLinear"]), 2)
    with pytest.raises(ValueError, match=match):
        solve(name, prob, **kw)


@pytest.mark.parametrize("name, kw", [("anderson", dict(m=0)), ("anderson", dict(damping=0)),
                                      ("broyden", dict(memory=0)), ("fixed_point_iter", dict(damping=2)),
                                      ("forward_backward", dict(alpha=-1.0)),
                                      ("peaceman_rachford", dict(alpha=0.0))])
def test_bad_solver_options(name, kw):
    prob, _ = problem_for(make_cell(SPEC["IBPMonLinear"]), 2)
    with pytest.raises(ValueError):
        solve(name, prob, **kw)


def test_forward_backward_default_step():
    ortho = make_cell(SPEC["OrthoLinear"])
    prob, _ = problem_for(ortho, 2)
    assert default_fb_alpha(prob) == 1.0  # contraction: plain iteration is certified
    mon = make_cell(SPEC["MonLinear"], scale=1.0)
    prob, _ = problem_for(mon, 2)
    a = default_fb_alpha(prob)
    Wd = mon.operator().dense().detach()
    IW = torch.eye(Wd.shape[0], dtype=Wd.dtype) - Wd
    assert 0 < a <= 2 * mon.margin / float(torch.linalg.svdvals(IW).max()) ** 2
    with pytest.raises(ValueError, match="margin"):
        default_fb_alpha(ReLUAffineProblem(mon.operator(), prob.bias))


def test_adjoint_problem_with_mask():
    """The backward system h = D (W^T h + g) is solved by every solver."""
    cell = make_cell(SPEC["MonLinear"])
    op = cell.operator()
    torch.manual_seed(1)
    g = torch.randn(6, cell.n, dtype=torch.float64)
    mask = (torch.rand_like(g) > 0.4).to(g.dtype)
    prob = ReLUAffineProblem(op, g, margin=cell.margin, transpose=True, mask=mask)
    Wd = op.dense().detach()
    # direct solve: (I - D W^T) h = D g
    I = torch.eye(cell.n, dtype=g.dtype)
    expected = torch.stack([torch.linalg.solve(I - torch.diag(m) @ Wd.T, m * gi) for m, gi in zip(mask, g)])
    for name in ("peaceman_rachford", "forward_backward", "anderson", "broyden"):
        h, st = solve(name, prob, z0=mask * g, tol=1e-11, max_iter=3000)
        assert st.converged, name
        torch.testing.assert_close(h, expected, rtol=0, atol=1e-8)


def test_float32_solvers():
    cell = L.IBPMonConv2d(3)
    u = torch.randn(4, 3, 6, 5)
    prob = ReLUAffineProblem(cell.operator(), u, margin=cell.margin)
    for name in SOLVERS:
        z, st = solve(name, prob, tol=1e-4, max_iter=100)
        assert z.dtype == torch.float32 and st.converged, name


# ---------------------------------------------------------------- scrambled monotone weights (#14)
def scrambled(kind, seed, dtype=torch.float64):
    """MonLinear(32) / MonConv2d(4) with every raw parameter set to param + 2 randn
    (``||I - W||`` ~ 500 at m = 0.5); batch of 6 injections (conv: 8x8 images)."""
    torch.manual_seed(seed)
    cell = L.MonLinear(32, dtype=dtype) if kind == "fc" else L.MonConv2d(4, dtype=dtype)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(2 * torch.randn(p.shape, generator=g, dtype=dtype))
    shape = (6, 32) if kind == "fc" else (6, 4, 8, 8)
    u = torch.randn(shape, generator=g, dtype=dtype)
    return cell, u


def dense_I_minus_W(cell, u):
    Wd = cell.operator().dense(None if u.dim() == 2 else tuple(u.shape[1:])).detach().double()
    return torch.eye(Wd.shape[0], dtype=torch.float64) - Wd


@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scrambled_weights_pr_default_converges(kind, seed):
    cell, u = scrambled(kind, seed)
    prob = ReLUAffineProblem(cell.operator(), u, margin=cell.margin)
    z, st = solve("peaceman_rachford", prob, tol=1e-6, max_iter=200)
    assert st.converged and st.iterations <= 100, st
    res = fixed_point_residual(cell, z, u)  # independent recomputation
    assert float(res.max()) <= 1e-6 * 1.0001
    # plain PR (anderson_m=0) reaches the same fixed point, with more iterations
    z0, st0 = solve("peaceman_rachford", prob, tol=1e-6, max_iter=400, anderson_m=0)
    assert st0.converged and st0.iterations > st.iterations
    torch.testing.assert_close(z0, z, rtol=0, atol=1e-6 * float(z.abs().max()))


def test_scrambled_float32_fc_converges():
    """float32 reaches tol 1e-4 at n = 32 (the residual's rounding floor there is ~3e-5)."""
    cell, u = scrambled("fc", 0, dtype=torch.float32)
    prob = ReLUAffineProblem(cell.operator(), u, margin=cell.margin)
    z, st = solve("peaceman_rachford", prob, tol=1e-4, max_iter=200)
    assert st.converged and st.iterations <= 100 and z.dtype == torch.float32


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_derived_fb_step_is_provably_convergent(kind):
    cell, u = scrambled(kind, 0)
    prob = ReLUAffineProblem(cell.operator(), u, margin=cell.margin)
    a = default_fb_alpha(prob)
    M = dense_I_minus_W(cell, u)
    Lexact = float(torch.linalg.svdvals(M).max())
    assert 0 < a <= 2 * cell.margin / Lexact ** 2
    b = _MonotoneForm(prob).monotone_bounds(full=True)
    q_exact = float(torch.linalg.svdvals(torch.eye(M.shape[0], dtype=M.dtype) - a * M).max())
    assert q_exact <= fb_rate(a, b) < 1
    # every FB step contracts the distance to z* by (at least) the proven factor
    z_star, st = solve("peaceman_rachford", prob, tol=1e-12, max_iter=500)
    assert st.converged
    d = [float((z_star).flatten(1).norm(dim=1).max())]
    z = torch.zeros_like(u)
    for _ in range(50):
        z, _ = solve("forward_backward", prob, z0=z, tol=0.0, max_iter=1, alpha=a)
        d.append(float((z - z_star).flatten(1).norm(dim=1).max()))
    q = fb_rate(a, b)
    assert all(d1 <= q * d0 * (1 + 1e-9) + 1e-12 for d0, d1 in zip(d, d[1:]))
    assert d[-1] < d[0]


def test_fb_converges_with_its_derived_step_on_a_moderate_cell():
    """Forward-backward to tol with the default step (q < 1 proven) on a moderately
    scrambled cell (scale 0.3: ||I - W|| ~ 10); on the scale-2 cells above its proven factor
    is 1 - 1e-6, so it only contracts (previous test), as slowly as promised."""
    torch.manual_seed(0)
    cell = L.MonLinear(16, dtype=torch.float64)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.3 * torch.randn_like(p))
    u = torch.randn(4, 16, dtype=torch.float64)
    prob = ReLUAffineProblem(cell.operator(), u, margin=cell.margin)
    z, st = solve("forward_backward", prob, tol=1e-6, max_iter=20000)
    assert st.converged
    assert float(fixed_point_residual(cell, z, u).max()) <= 1e-6 * 1.0001


@pytest.mark.parametrize("scale", [None, 2.0])
def test_pr_and_fb_rates_bound_the_exact_factors(scale):
    """The proven rates (steps.py) dominate the exact float64 norms of the linear parts:
    ||(I - a M)(I + a M)^-1|| for PR, ||I - a M|| for FB, over a range of steps."""
    cell = make_cell(SPEC["MonLinear"])
    if scale is not None:
        with torch.no_grad():
            for p in cell.parameters():
                p.add_(scale * torch.randn_like(p))
    prob, u = problem_for(cell, 2)
    M = dense_I_minus_W(cell, u)
    E = torch.eye(M.shape[0], dtype=M.dtype)
    b = _MonotoneForm(prob).monotone_bounds()
    Lx = float(torch.linalg.svdvals(M).max())
    for a in [0.1 / Lx, 1 / Lx, default_pr_alpha(prob), 1 / cell.margin]:
        exact = float(torch.linalg.svdvals((E - a * M) @ torch.linalg.inv(E + a * M)).max())
        assert exact <= pr_rate(a, b) + 1e-12 < 1
        # never worse than the (m, L)-only bound sqrt((1 - 2am + a^2L^2) / (1 + 2am + a^2L^2))
        c = 1 + a * a * b.lip ** 2
        assert pr_rate(a, b) <= ((c - 2 * a * b.m) / (c + 2 * a * b.m)) ** 0.5 + 1e-12
    for a in [0.5 * b.m / Lx ** 2, 2 * b.m / Lx ** 2]:
        assert float(torch.linalg.svdvals(E - a * M).max()) <= fb_rate(a, b) + 1e-12
    # the derived PR step is (near-)optimal for the proven bound: within 1% of a fine search
    fine = torch.logspace(-4, 1, 2000, dtype=torch.float64)
    assert pr_rate(default_pr_alpha(prob), b) <= float(pr_rate(fine, b).min()) * 1.01


def test_pr_rate_closed_forms():
    # symmetric M (no skew): a = 1 / sqrt(m s), delta = (sqrt(k) - 1) / (sqrt(k) + 1)
    b = MonotoneBounds(m=0.5, sym_max=50.0, skew=0.0, lip=50.0, l0=51.0)
    a = pr_alpha(b)
    assert a == pytest.approx(0.2, rel=0.05)
    assert 9 / 11 <= pr_rate(a, b) <= 9 / 11 * 1.002  # rigorous cells: an upper bound, tight
    # only m and L known (skew dominates): a = 1 / L, delta = sqrt((L - m) / (L + m))
    b = MonotoneBounds(m=0.5, sym_max=0.5, skew=100.0, lip=100.0, l0=101.0)
    assert pr_alpha(b) == pytest.approx(0.01, rel=0.05)
    delta = (99.5 / 100.5) ** 0.5
    assert delta <= pr_rate(pr_alpha(b), b) <= delta * 1.0001
    with pytest.raises(ValueError, match="m > 0"):
        MonotoneBounds(m=0.0, sym_max=1.0, skew=0.0, lip=1.0, l0=1.0)


def test_scrambled_adjoint_problem_converges():
    """The backward system h = D (W^T h + g) with scrambled weights, against a direct solve."""
    cell, u = scrambled("fc", 1)
    op = cell.operator()
    g = torch.randn_like(u)
    mask = (torch.rand_like(g) > 0.4).to(g.dtype)
    prob = ReLUAffineProblem(op, g, margin=cell.margin, transpose=True, mask=mask)
    h, st = solve("peaceman_rachford", prob, z0=mask * g, tol=1e-10, max_iter=300)
    assert st.converged
    Wd = op.dense().detach()
    I = torch.eye(Wd.shape[0], dtype=g.dtype)
    expected = torch.stack([torch.linalg.solve(I - torch.diag(m) @ Wd.T, m * gi) for m, gi in zip(mask, g)])
    torch.testing.assert_close(h, expected, rtol=0, atol=1e-7 * float(expected.abs().max()))


def test_bad_pr_anderson_options():
    prob, _ = problem_for(make_cell(SPEC["MonLinear"]), 2)
    for kw in (dict(anderson_m=-1), dict(anderson_m=1.5), dict(anderson_lam=-1.0)):
        with pytest.raises(ValueError, match="anderson_"):
            solve("peaceman_rachford", prob, **kw)


# ------------------------------------------------------------------- compacting Anderson (row stopping)
def _affine_rows(n=6, B=8, seed=0):
    """``f_i(z) = A z + b_i`` with ``||A||_2 = 0.6`` (a contraction), float64; the exact fixed points."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A *= 0.6 / torch.linalg.matrix_norm(A, 2)
    b = torch.randn(B, n, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(n, dtype=A.dtype) - A, b.T).T
    return A, b, z_star


def _run_compacting(A, b, accept_rule, **kw):
    """compacting_anderson on the affine rows; records which original rows every step call saw."""
    from lirpa_deq.solvers import compacting_anderson
    seen = []
    ids = torch.arange(b.shape[0])

    def step(z, b_rows, id_rows):
        seen.append(id_rows.tolist())
        return z @ A.T + b_rows, id_rows

    def stop_rows(it, z, id_rows):
        return accept_rule(it, id_rows), (z.clone(), id_rows.clone())

    res = compacting_anderson(step, torch.zeros_like(b), stop_rows, row_args=(b, ids), **kw)
    return res, seen


def test_compacting_anderson_converges_on_a_contraction():
    A, b, z_star = _affine_rows()
    never = lambda it, ids: torch.zeros_like(ids, dtype=torch.bool)  # noqa: E731
    res, _ = _run_compacting(A, b, never, tol=1e-11, max_iter=100, m=5)
    z, ids = res.outputs
    assert torch.equal(ids, torch.arange(b.shape[0]))  # outputs come back in the original row order
    torch.testing.assert_close(z, z_star, rtol=0, atol=1e-9)
    assert (res.stop_iter < 100).all() and res.iterations == int(res.stop_iter.max())
    # plain Picard needs far more iterations than Anderson on the same problem
    res1, _ = _run_compacting(A, b, never, tol=1e-11, max_iter=500, m=1, lam=0.0)
    torch.testing.assert_close(res1.outputs[0], z_star, rtol=0, atol=1e-9)
    assert res1.iterations > res.iterations


def test_compacting_anderson_stopped_row_is_frozen_and_dropped():
    A, b, z_star = _affine_rows(B=4)
    stop_row0 = lambda it, ids: ids == 0  # noqa: E731  (row 0 is accepted at the first test)
    res, seen = _run_compacting(A, b, stop_row0, tol=1e-11, max_iter=100)
    z, _ = res.outputs
    assert res.stop_iter[0] == 0 and torch.equal(z[0], torch.zeros_like(z[0]))  # recorded at z0, kept
    # 1 of 4 rows stopped: the batch is compacted at once, row 0 is never evaluated again
    assert seen[0] == [0, 1, 2, 3] and seen[1] == [1, 2, 3] and all(0 not in s for s in seen[1:])
    assert res.row_iterations == sum(len(s) for s in seen[1:]) and res.iterations == len(seen) - 1
    torch.testing.assert_close(z[1:], z_star[1:], rtol=0, atol=1e-9)
    # the other rows' iterates do not depend on row 0 being stopped
    never = lambda it, ids: torch.zeros_like(ids, dtype=torch.bool)  # noqa: E731
    ref, _ = _run_compacting(A, b, never, tol=1e-11, max_iter=100)
    assert torch.equal(res.stop_iter[1:], ref.stop_iter[1:])
    torch.testing.assert_close(z[1:], ref.outputs[0][1:], rtol=0, atol=1e-12)


def test_compacting_anderson_carried_row_keeps_its_recorded_output():
    A, b, z_star = _affine_rows(B=8)
    stop_row0 = lambda it, ids: (ids == 0) & (it == 2)  # noqa: E731
    res, seen = _run_compacting(A, b, stop_row0, tol=1e-11, max_iter=100)
    # 7 of 8 still running: no compaction, row 0 is carried along but its output is that of it = 2
    assert res.stop_iter[0] == 2 and seen[3] == list(range(8)) and (res.stop_iter[1:] > 3).all()
    ref, _ = _run_compacting(A, b, lambda it, ids: torch.zeros_like(ids, dtype=torch.bool),
                             tol=0.0, max_iter=2)
    assert (ref.stop_iter == 2).all()
    torch.testing.assert_close(res.outputs[0][0], ref.outputs[0][0], rtol=0, atol=0)
    assert not torch.allclose(res.outputs[0][0], z_star[0], atol=1e-6)  # it really stopped early
    torch.testing.assert_close(res.outputs[0][1:], z_star[1:], rtol=0, atol=1e-9)


def test_compacting_anderson_min_iter_max_iter_and_map_kept():
    A, b, _ = _affine_rows(B=5)
    always = lambda it, ids: torch.ones_like(ids, dtype=torch.bool)  # noqa: E731
    res, seen = _run_compacting(A, b, always, min_iter=3, max_iter=100, keep_map_at_min_iter=True)
    assert (res.stop_iter == 3).all() and res.iterations == 3 and len(seen) == 4
    torch.testing.assert_close(res.map_at_min_iter, res.outputs[0] @ A.T + b, rtol=0, atol=0)
    res2, _ = _run_compacting(A, b, always, min_iter=0, max_iter=1)
    assert (res2.stop_iter == 0).all() and res2.iterations == 0 and res2.map_at_min_iter is None


@pytest.mark.parametrize("kw,match", [(dict(m=0), "memory m"), (dict(lam=-1.0), "lam"),
                                      (dict(damping=0.0), "damping"), (dict(min_iter=-1), "min_iter"),
                                      (dict(max_iter=0), "max_iter"), (dict(tol=-1.0), "tol")])
def test_compacting_anderson_bad_options(kw, match):
    A, b, _ = _affine_rows(B=2)
    with pytest.raises(ValueError, match=match):
        _run_compacting(A, b, lambda it, ids: ids >= 0, **kw)


@pytest.mark.parametrize("method", ["bicgstab", "cgnr"])
def test_matrix_free_resolvent_matches_dense_solve(method):
    from lirpa_deq.solvers.linear import iterative_resolvent
    cell, u = scrambled("conv", 0)
    op = cell.operator()
    a = default_pr_alpha(ReLUAffineProblem(op, u, margin=cell.margin))
    J = iterative_resolvent(op.W, op.WT, a, tol=1e-12, max_iter=2000, method=method)
    M = dense_I_minus_W(cell, u)
    K = torch.eye(M.shape[0], dtype=M.dtype) + a * M
    x = J(u)
    ref = torch.linalg.solve(K, u.flatten(1).T).T.view_as(u)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-9 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="method"):
        iterative_resolvent(op.W, op.WT, a, tol=1e-6, max_iter=10, method="gmres")
