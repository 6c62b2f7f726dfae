"""The fused, compacting Anderson solve of agreement-SRS: it converges to the exact fixed points, and
whatever its float32 stopping test says (even when it is replaced by one that always says "certified"),
a sample is counted only if the exact DEQ's label is the candidate class -- on the fused path and
on the generic (other solver) path, for Mon / IBP-Mon (with similarity) cells."""
import math

import pytest
import torch

from test_smoothing_agreement import exact_states, small_model

from lirpa_deq.smoothing.agreement import AgreementCertifier, split_deq_model
from lirpa_deq.smoothing.core import gaussian_noise
from lirpa_deq.smoothing.fastpath import AgreementPass
from lirpa_deq.smoothing.fused import FusedAnderson, StopTest


@pytest.mark.parametrize("kind", ["mon", "ibp"])
def test_fused_solve_reaches_fixed_point(kind):
    model = small_model(kind, seed=4)
    pre, deq, post = split_deq_model(model)
    with torch.no_grad():
        u = pre(torch.randn(300, 3, generator=torch.Generator().manual_seed(2)))
        deq.cell.state_shape(u.shape)
        cert = AgreementCertifier(deq, post, u.shape[1:], u.device)
        op = deq.cell.operator()
        op.prepare(tuple(u.shape[1:]))
        fused = FusedAnderson(op, u.shape[1:], StopTest(cert, u.dtype, u.device), m=5)
        # kappa = inf: the stopping test never passes, every row runs to the residual tolerance
        chain, states, labels, passed, it = fused.solve(u, torch.zeros_like(u), steps=2, max_iter=500,
                                                        stop_tol=1e-6, kappa=float("inf"))
        z_star = exact_states(model, u).float()
    assert not passed.any() and (it >= 2).all() and chain.shape == u.shape
    assert (states - z_star).norm(dim=1).max() <= 1e-4 * (1 + z_star.norm(dim=1).max())
    assert 0 < fused.row_iterations < 500 * 300
    exact_labels = (z_star.double() @ cert.A.T + cert.b).argmax(1)
    assert (labels == exact_labels).float().mean() > 0.99
    # with the real stopping test rows stop early, and compaction keeps the bookkeeping right
    rows_before = fused.row_iterations
    _, states2, labels2, passed2, it2 = fused.solve(u, torch.zeros_like(u), steps=1, max_iter=500, stop_tol=1e-6)
    assert passed2.float().mean() > 0.9 and fused.row_iterations - rows_before < rows_before
    lab64, ok64 = cert.check(states2, u)
    assert torch.equal(lab64[ok64], labels2[ok64]) and ok64[passed2].float().mean() > 0.99


def _replay_inputs(pre, x, n0, n, bs, sigma, seed):
    """The estimation-phase injections ``u`` that AgreementPass.run draws for this seed."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(math.ceil(n0 / bs)):
        gaussian_noise(x, bs, sigma, g)
    with torch.no_grad():
        return torch.cat([pre(gaussian_noise(x, bs, sigma, g)) for _ in range(math.ceil(n / bs))])[:n]


@pytest.mark.parametrize("kind,solver,optimistic", [("mon", "anderson", False), ("mon", "anderson", True),
                                                    ("ibp", "anderson", True), ("mon", "broyden", False),
                                                    ("ibp", "fixed_point_iter", False)])
def test_counted_samples_have_exact_label(kind, solver, optimistic, monkeypatch):
    model = small_model(kind, seed=5)
    model[1].solver = solver
    from lirpa_deq.solvers import get_solver
    model[1]._solver = get_solver(solver)
    if solver == "fixed_point_iter":
        model[1].max_iter = 2000
    if optimistic:  # a stopping test that always claims "certified": only the float64 check may count
        real = StopTest.__call__

        def liar(self, z, pre, kappa):
            lab, ok, zc = real(self, z, pre, kappa)
            return lab, torch.ones_like(ok), zc
        monkeypatch.setattr(StopTest, "__call__", liar)
    pre, deq, post = split_deq_model(model)
    x, sigma, n0, n, bs = torch.tensor([0.3, -0.2, -1.0]), 0.8, 30, 500, 100
    pas = AgreementPass(pre, deq, post, 3, steps=1)
    counts0, c_a, labels, proved, fast = pas.run(x, n0, n, bs, sigma, torch.Generator().manual_seed(7), False)
    assert (pas.fused is None) == (solver == "broyden")
    u = _replay_inputs(pre, x, n0, n, bs, sigma, 7)
    z_star = exact_states(model, u)
    exact = (z_star @ post[0].weight.double().T + post[0].bias.double()).argmax(1)
    assert counts0.sum() == n0 and labels.shape == proved.shape == fast.shape == (n,)
    assert (exact[proved] == c_a).all(), "a counted sample's exact label is not the candidate class"
    assert (labels[proved] == c_a).all()
    if not optimistic:  # and the certificate has power: most samples of class c_a are counted
        assert proved.sum() >= 0.9 * (exact == c_a).sum() > 0
    else:
        assert pas.retried > 0 or proved.sum() >= 0.9 * (exact == c_a).sum()
