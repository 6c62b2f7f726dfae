"""The fixed-point problem object (lirpa_deq.nn.fixed_point) and the context-local warm starts."""
import copy
import threading

import pytest
import torch

import lirpa_deq.nn.fixed_point as fp
from lirpa_deq.nn import (DEQ, GenericFixedPoint, IBPMonLinear, ReLUAffineFixedPoint, TanhCell,
                          fixed_point_problem, register_fixed_point, serial_warm_start, warm_start_state)
from lirpa_deq.solvers import get_solver

F64 = torch.float64


def _cells():
    torch.manual_seed(0)
    return [IBPMonLinear(6, dtype=F64), TanhCell(6, 6, contraction=0.7).to(F64)]


def _dense_jacobian(cell, z, x):
    """d cell(z, x) / d z for one sample (float64, autograd)."""
    return torch.autograd.functional.jacobian(lambda v: cell(v[None], x[None])[0], z)


@pytest.mark.parametrize("which", [0, 1], ids=["relu_affine", "generic"])
def test_problem_object_solves_steps_and_adjoints_like_the_dense_formulas(which):
    cell = _cells()[which]
    problem = fixed_point_problem(cell)
    assert type(problem) is (ReLUAffineFixedPoint, GenericFixedPoint)[which]
    u = torch.randn(3, 6, dtype=F64)
    z0 = torch.zeros_like(u)
    problem.prepare(u, z0)
    z, stats = get_solver("anderson")(problem.solver_map(u), z0, tol=1e-12, max_iter=200)
    assert stats.converged
    out = problem.step(z, u)
    torch.testing.assert_close(out, z, rtol=0, atol=1e-10)  # a fixed point
    # the adjoint system's solution is (I - J^T)^-1 grad, J the cell's Jacobian in z at z*
    grad = torch.randn_like(u)
    system = problem.adjoint(z, out, u)
    with torch.no_grad():
        h, _ = get_solver("anderson")(system.map(grad), system.start(grad), tol=1e-12, max_iter=200)
        g = system.finish(grad, h)
    for i in range(3):
        J = _dense_jacobian(cell, z[i], u[i])
        expect = torch.linalg.solve(torch.eye(6, dtype=F64) - J.T, grad[i])
        torch.testing.assert_close(g[i], expect, rtol=1e-8, atol=1e-9)


def test_deq_gradient_equals_implicit_function_theorem_for_both_families():
    for cell in _cells():
        deq = DEQ(cell, solver="anderson", tol=1e-12, max_iter=300)
        u = torch.randn(2, 6, dtype=F64, requires_grad=True)
        w = torch.randn(2, 6, dtype=F64)
        (deq(u) * w).sum().backward()
        with torch.no_grad():
            z = deq(u)
        for i in range(2):
            J = _dense_jacobian(cell, z[i], u[i].detach())
            Ju = torch.autograd.functional.jacobian(lambda x: cell(z[i][None], x[None])[0], u[i].detach())
            # dz*/du = (I - J)^-1 Ju
            expect = Ju.T @ torch.linalg.solve(torch.eye(6, dtype=F64) - J.T, w[i])
            torch.testing.assert_close(u.grad[i], expect, rtol=1e-7, atol=1e-9)


class CountingTanhProblem(GenericFixedPoint):
    """A user's family: the generic problem with a dense, exact adjoint (counts its uses)."""

    adjoints = 0

    def adjoint(self, z, out, x):
        CountingTanhProblem.adjoints += 1
        return super().adjoint(z, out, x)


def test_registered_family_drives_the_deq(monkeypatch):
    monkeypatch.setattr(fp, "_FAMILIES", list(fp._FAMILIES))
    register_fixed_point(TanhCell, CountingTanhProblem)
    cell = _cells()[1]
    deq = DEQ(cell, tol=1e-10, max_iter=200)
    assert isinstance(deq.problem(), CountingTanhProblem) and deq.generic
    u = torch.randn(2, 6, dtype=F64, requires_grad=True)
    before = CountingTanhProblem.adjoints
    deq(u).sum().backward()
    assert CountingTanhProblem.adjoints == before + 1 and u.grad is not None
    with pytest.raises(TypeError, match="FixedPointProblem"):
        register_fixed_point(TanhCell, object)


def test_eager_solve_refuses_a_dtype_mismatch_with_the_fix():
    for cell in (IBPMonLinear(4), TanhCell(4, 4)):
        with pytest.raises(TypeError, match=r"float64 but its cell's parameters are torch.float32.*x.to\(dtype\)"):
            DEQ(cell)(torch.randn(2, 4, dtype=F64))


def test_warm_start_state_is_context_local_and_not_on_the_module():
    deq = DEQ(IBPMonLinear(4, dtype=F64), solver="anderson")
    seen = {}
    with serial_warm_start(deq, max_iter=2):
        state = warm_start_state(deq)
        assert state is not None and state.max_iter == 2 and state.prev is None
        with torch.no_grad():
            out = deq(torch.randn(3, 4, dtype=F64))
        torch.testing.assert_close(state.prev, out)
        thread = threading.Thread(target=lambda: seen.setdefault("other", warm_start_state(deq)))
        thread.start()
        thread.join()
        assert warm_start_state(copy.deepcopy(deq)) is None  # a copy is a different module
        assert not any("prev" in k or "serial" in k for k in deq.state_dict())
    assert seen["other"] is None  # another thread solves normally
    assert warm_start_state(deq) is None
