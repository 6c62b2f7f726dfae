"""The DEQ layer: fixed point, implicit gradients, options, convergence policy, warm starts."""
import warnings

import pytest
import torch
import torch.nn as nn

import lirpa_deq.nn as L
from lirpa_deq.nn import (DEQ, DEQConvergenceError, DEQConvergenceWarning, deq_modules, serial_warm_start,
                          warm_start_state)
from test_nn_common import CELL_IDS, CELL_SPECS, fixed_point_residual, make_cell, state_shape

SPEC = dict(zip(CELL_IDS, CELL_SPECS))
F64 = torch.float64


def tiny(cid, seed=0):
    """A very small float64 cell for gradcheck (fc n=5, conv 2 channels on 3x3 images)."""
    cls = type(make_cell(SPEC[cid]))
    torch.manual_seed(seed)
    kw = {"similarity": True} if cid.endswith("-sim") else {}
    cell = cls(5 if "Linear" in cid else 2, dtype=F64, **kw)
    if kw:
        with torch.no_grad():
            cell.s.normal_(0, 0.5)
    shape = (2, 5) if "Linear" in cid else (2, 2, 3, 3)
    return cell, shape


@pytest.mark.parametrize("cid", CELL_IDS)
def test_forward_is_a_fixed_point(cid):
    cell = make_cell(SPEC[cid])
    deq = DEQ(cell, solver="peaceman_rachford", tol=1e-8, max_iter=200)
    u = torch.randn(state_shape(cell, 5), dtype=F64)
    z = deq(u)
    assert z.shape == u.shape and z.dtype == F64
    assert float(fixed_point_residual(cell, z, u).max()) < 1e-7
    assert deq.last_stats.converged and deq.last_stats.solver == "peaceman_rachford"
    torch.testing.assert_close(deq.solve(u), z)


GRAD_CASES = [("MonLinear", "anderson"), ("IBPMonLinear-sim", "peaceman_rachford"),
              ("OrthoLinear", "broyden"), ("MonConv2d", "broyden"),
              ("IBPMonConv2d-sim", "anderson"), ("OrthoConv2d", "forward_backward")]


@pytest.mark.parametrize("cid, solver", GRAD_CASES)
def test_gradcheck_wrt_input_and_params(cid, solver):
    cell, shape = tiny(cid)
    deq = DEQ(cell, solver=solver, tol=1e-13, max_iter=3000, on_nonconvergence="raise")
    u = torch.randn(shape, dtype=F64, requires_grad=True)
    fast = "Conv" in cid  # conv: random-projection gradcheck keeps the number of solves small
    assert torch.autograd.gradcheck(lambda u: deq(u), (u,), fast_mode=fast)
    names = [k for k, _ in cell.named_parameters()]
    ps = [p.detach().clone().requires_grad_() for _, p in cell.named_parameters()]
    assert torch.autograd.gradcheck(lambda *ps: deq.solve(u.detach(), params=dict(zip(names, ps))), ps,
                                    fast_mode=fast)
    assert deq.last_backward_stats is not None and deq.last_backward_stats.converged


@pytest.mark.parametrize("cid", ["MonLinear", "IBPMonLinear-sim", "OrthoConv2d", "MonConv2d"])
def test_implicit_matches_unrolled(cid):
    cell, shape = tiny(cid, seed=1)
    u = torch.randn(shape, dtype=F64, requires_grad=True)
    w = torch.randn(shape, dtype=F64)
    grads = []
    runs = [(True, "anderson"), (False, "forward_backward")]
    if "Linear" in cid:  # unrolling PR through CG (conv) is slow; fc PR is a dense inverse
        runs += [(False, "peaceman_rachford"), (False, "broyden"), (False, "anderson")]
    for implicit, solver in runs:
        deq = DEQ(cell, solver=solver, tol=1e-12, max_iter=5000, implicit=implicit,
                  on_nonconvergence="raise")
        grads.append(torch.autograd.grad((deq(u) * w).sum(), [u] + list(cell.parameters())))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_every_backward_solver_gives_the_same_gradient():
    cell = make_cell(SPEC["MonLinear"])
    u = torch.randn(4, cell.n, dtype=F64, requires_grad=True)
    ref = None
    for b in ["peaceman_rachford", "forward_backward", "anderson", "broyden"]:
        deq = DEQ(cell, solver="peaceman_rachford", backward_solver=b, tol=1e-11,
                  backward_max_iter=3000, on_nonconvergence="raise")
        g = torch.autograd.grad(deq(u).square().sum(), [u, cell.A])
        assert deq.last_backward_stats.solver == b
        if ref is None:
            ref = g
        for a, r in zip(g, ref):
            torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)


def test_params_override_matches_cell_with_those_params():
    cell, other = make_cell(SPEC["IBPMonLinear-sim"], seed=1), make_cell(SPEC["IBPMonLinear-sim"], seed=2)
    u = torch.randn(3, cell.n, dtype=F64)
    params = {k: v.detach().clone().requires_grad_() for k, v in other.named_parameters()}
    z = DEQ(cell, tol=1e-10, max_iter=200).solve(u, params=params)
    torch.testing.assert_close(z, DEQ(other, tol=1e-10, max_iter=200)(u))
    z.sum().backward()
    assert all(p.grad is not None for p in params.values())
    assert all(p.grad is None for p in cell.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(solver="newton"), r"unknown solver 'newton'; valid solvers: \['anderson'"),
    (dict(backward_solver="cg"), r"unknown solver 'cg'"),
    (dict(on_nonconvergence="maybe"), r"on_nonconvergence='maybe' is not one of \('warn', 'raise', 'ignore'\)"),
    (dict(tol=-1e-3), r"tol must be a real number >= 0, got -0.001"),
    (dict(max_iter=0), r"max_iter must be an integer >= 1, got 0"),
    (dict(backward_tol=-1), r"backward_tol must be"),
    (dict(backward_max_iter=0), r"backward_max_iter must be"),
    (dict(history=3), r"unknown solver option\(s\) \['history'\].*valid options: \['damping', 'lam', 'm'\]"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DEQ(L.IBPMonLinear(4), **kwargs)


def test_bad_cell_and_shapes():
    with pytest.raises(TypeError, match=r"nn.Module cell with forward\(z, x\)"):
        DEQ(lambda z, x: z)
    with pytest.raises(ValueError, match="splitting solver.*generic cell"):
        DEQ(nn.Linear(3, 3), solver="peaceman_rachford")
    deq = DEQ(L.IBPMonLinear(4))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        deq(torch.randn(2, 5))
    with pytest.raises(ValueError, match="z0 shape"):
        deq(torch.randn(2, 4), z0=torch.zeros(3, 4))


def test_solver_options_reach_the_solver():
    cell = make_cell(SPEC["MonLinear"])
    u = torch.randn(3, cell.n, dtype=F64)
    a = DEQ(cell, solver="anderson", m=1, tol=1e-8, max_iter=500, on_nonconvergence="ignore")
    b = DEQ(cell, solver="anderson", m=6, tol=1e-8, max_iter=500, on_nonconvergence="ignore")
    a(u), b(u)
    assert b.last_stats.iterations < a.last_stats.iterations  # memory 1 is plain iteration
    # options of the backward solver only are accepted and routed to it
    DEQ(cell, solver="anderson", backward_solver="peaceman_rachford", alpha=0.5)


def test_nonconvergence_policies():
    cell = make_cell(SPEC["MonLinear"])
    u = torch.randn(2, cell.n, dtype=F64)
    with pytest.raises(DEQConvergenceError, match=r"forward solve with anderson did not converge: "
                                                  r"residual .* after 1 iterations"):
        DEQ(cell, solver="anderson", tol=1e-12, max_iter=1, on_nonconvergence="raise")(u)
    assert issubclass(DEQConvergenceError, RuntimeError)
    with pytest.raises(DEQConvergenceError, match=r"with peaceman_rachford .* Hint: raise max_iter "
                                                  r"\(Peaceman-Rachford converges"):
        DEQ(cell, tol=1e-12, max_iter=1, on_nonconvergence="raise")(u)  # the monotone default
    with pytest.warns(DEQConvergenceWarning, match="peaceman_rachford.*margin"):
        DEQ(cell, tol=1e-12, max_iter=2, on_nonconvergence="warn")(u)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq = DEQ(cell, tol=1e-12, max_iter=1, on_nonconvergence="ignore")
        deq(u)
    assert not deq.last_stats.converged and deq.last_stats.iterations == 1
    # backward non-convergence follows the same policy
    deq = DEQ(cell, tol=1e-10, max_iter=500, backward_max_iter=1, on_nonconvergence="raise")
    out = deq(u.clone().requires_grad_())
    with pytest.raises(DEQConvergenceError, match="backward solve"):
        out.sum().backward()


def test_serial_warm_start_matches_normal_forward_for_large_k():
    cell = make_cell(SPEC["IBPMonLinear"])
    deq = DEQ(cell, solver="anderson", tol=1e-9, max_iter=100)
    model = nn.Sequential(nn.Linear(6, cell.n, dtype=F64), deq)
    xs = [torch.randn(8, 6, dtype=F64) for _ in range(3)]
    with torch.no_grad():
        normal = [model(x) for x in xs]
        with serial_warm_start(model, max_iter=100) as mods:
            assert mods == [deq] and deq_modules(model) == [deq]
            warm = [model(x) for x in xs]
    for a, b in zip(normal, warm):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_serial_warm_start_one_step_and_restore():
    cell = make_cell(SPEC["IBPMonConv2d"])
    deq = DEQ(cell, solver="anderson", tol=1e-6, max_iter=60, on_nonconvergence="raise")
    x = torch.randn(1, cell.channels, 5, 4, dtype=F64)
    iters = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may warn or raise inside the context
        with serial_warm_start(deq, max_iter=1):
            for _ in range(4):
                deq(x + 0.05 * torch.randn(16, *x.shape[1:], dtype=F64))
                iters.append(deq.last_stats.iterations)
            deq(torch.randn(3, cell.channels, 4, 4, dtype=F64))  # new shape: cold start, full budget
            iters.append(deq.last_stats.iterations)
        assert iters[0] > 1 and iters[1:4] == [1, 1, 1] and iters[4] > 1
        assert warm_start_state(deq) is None
        deq(x)  # back to normal: cold start, full budget, policy 'raise' again
        assert deq.last_stats.iterations > 1
    with pytest.raises(ValueError, match="max_iter"):
        with serial_warm_start(deq, max_iter=0):
            pass


def test_nested_serial_warm_start_restores_outer():
    deq = DEQ(L.IBPMonLinear(4))
    with serial_warm_start(deq, max_iter=3):
        outer = warm_start_state(deq)
        with serial_warm_start(deq, max_iter=1):
            assert warm_start_state(deq).max_iter == 1
        assert warm_start_state(deq) is outer
    assert warm_start_state(deq) is None


def test_training_smoke():
    torch.manual_seed(0)
    h = 32
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, h), DEQ(L.IBPMonLinear(h), tol=1e-5, max_iter=50),
                          nn.Linear(h, 10))
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert model[2].cell.M.grad is not None and model[2].last_backward_stats.converged


def test_float32_default_dtype():
    deq = DEQ(L.MonConv2d(3), solver="peaceman_rachford", tol=1e-4)
    u = torch.randn(2, 3, 6, 6, requires_grad=True)
    z = deq(u)
    assert z.dtype == torch.float32 and deq.last_stats.converged
    z.sum().backward()
    assert u.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cid", CELL_IDS)
def test_cuda_deq(cid):
    cell = make_cell(SPEC[cid]).cuda()
    for solver in ("anderson", "peaceman_rachford"):
        deq = DEQ(cell, solver=solver, tol=1e-6, max_iter=200, on_nonconvergence="raise")
        u = torch.randn(state_shape(cell, 4), dtype=F64, device="cuda", requires_grad=True)
        z = deq(u)
        z.sum().backward()
        assert z.device.type == "cuda" and u.grad.device.type == "cuda"


# ---------------------------------------------------------------- default solver per cell (#14)
@pytest.mark.parametrize("cid", CELL_IDS)
def test_default_solver_per_cell(cid):
    cell = make_cell(SPEC[cid])
    deq = DEQ(cell)
    mono = cell.guarantee == "monotone"
    assert deq.solver == deq.backward_solver == ("peaceman_rachford" if mono else "anderson")
    assert deq.max_iter == deq.backward_max_iter == (200 if mono else 50)
    chosen = DEQ(cell, solver="anderson")  # a named solver keeps the old budget
    assert chosen.solver == "anderson" and chosen.max_iter == 50
    assert DEQ(cell, solver=None, max_iter=7).max_iter == 7
    assert DEQ(nn.Linear(3, 3)).solver == "anderson"  # generic cell


def scrambled_cell(kind, seed, dtype=F64):
    """Every raw parameter + 2 randn: ||I - W|| ~ 500 at m = 0.5 (fc n = 24, conv 3 channels)."""
    torch.manual_seed(seed)
    cell = L.MonLinear(24, dtype=dtype) if kind == "fc" else L.MonConv2d(3, dtype=dtype)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(2 * torch.randn_like(p))
    shape = (5, 24) if kind == "fc" else (3, 3, 7, 6)
    return cell, torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scrambled_default_solve_and_backward_converge(kind, seed):
    cell, u = scrambled_cell(kind, seed)
    deq = DEQ(cell, tol=1e-6, on_nonconvergence="raise")  # the default solver for this cell
    uu = u.clone().requires_grad_()
    z = deq(uu)
    st = deq.last_stats
    assert st.solver == "peaceman_rachford" and st.converged and st.iterations <= 100
    # the output is one cell step past z* (residual <= tol there): its own residual may be up
    # to ||W|| times larger
    Wd = cell.operator().dense(None if kind == "fc" else tuple(u.shape[1:])).detach()
    assert float(fixed_point_residual(cell, z, u).max()) <= 1e-6 * float(torch.linalg.svdvals(Wd).max())
    w = torch.randn_like(u)
    (z * w).sum().backward()
    bst = deq.last_backward_stats
    assert bst.converged and bst.iterations <= 100
    if kind == "fc":  # exact implicit gradient: dz = (I - D W)^-1 D du, so du = D (I - W^T D)^-1 w
        I = torch.eye(Wd.shape[0], dtype=F64)
        with torch.no_grad():
            D = (z.detach() > 0).to(F64)
            ref = torch.stack([d * torch.linalg.solve(I - Wd.T @ torch.diag(d), wi) for d, wi in zip(D, w)])
        torch.testing.assert_close(uu.grad, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_scrambled_old_default_fails_new_default_converges():
    """The issue: Anderson (the old default) stops at max_iter with a large residual on a
    scrambled MonLinear; the new default converges within its budget, float32 included."""
    cell, u = scrambled_cell("fc", 0, dtype=torch.float32)
    old = DEQ(cell, solver="anderson", max_iter=50, on_nonconvergence="ignore")
    old(u)
    new = DEQ(cell, on_nonconvergence="raise")
    new(u)
    assert not old.last_stats.converged and old.last_stats.residual > 1e-2
    assert new.last_stats.converged and new.last_stats.iterations < 100
