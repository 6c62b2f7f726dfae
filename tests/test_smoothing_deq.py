"""SRS on a real (small) DEQ: with enough warm-started steps it reproduces plain smoothing exactly.

Skipped cleanly when ``lirpa_deq.nn`` (DEQ layer, ``serial_warm_start``) is not available.
"""
import warnings

import pytest
import torch

nn_mod = pytest.importorskip("lirpa_deq.nn")
if not hasattr(nn_mod, "serial_warm_start") or not hasattr(nn_mod, "IBPMonLinear"):
    pytest.skip("lirpa_deq.nn lacks serial_warm_start / IBPMonLinear", allow_module_level=True)

from lirpa_deq.smoothing import ABSTAIN, SerializedSmooth, Smooth  # noqa: E402
from lirpa_deq.smoothing.stats import cp_lower  # noqa: E402


def small_deq(seed=0):
    torch.manual_seed(seed)
    deq = nn_mod.DEQ(nn_mod.IBPMonLinear(24, m=0.5), solver="anderson", tol=1e-6, max_iter=100)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 24), deq, torch.nn.Linear(24, 3))
    return model.eval(), deq


def test_srs_many_steps_reproduces_plain_decisions():
    model, deq = small_deq()
    calls = []
    deq.register_forward_hook(lambda m, i, o: calls.append(m.last_stats.iterations))
    x = torch.rand(1, 4, 4)
    n0, n, alpha, bs = 20, 200, 0.01, 50
    # audit every sample: then SRS's count is the converged count on the SAME noise draws
    srs = SerializedSmooth(model, 3, 0.25, steps=100, audit_size=n, certificate="audit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged solves must not warn
        res = srs.certify_detailed(x, n0, n, alpha, bs, seed=0)
    assert res.extra["audit_disagree"] == 0  # warm-started solves agree with converged ones
    assert res.count == res.extra["n_fast"]
    # identical decision to Cohen's CERTIFY run on those counts (at alpha_1)
    expect_p = cp_lower(res.extra["n_fast"], n, res.extra["alpha_1"])
    assert res.p_lower == pytest.approx(expect_p)
    # serialized calls: 1 selection (warm-up) + 4 estimation; then the audit (converged) calls
    assert len(calls) == 1 + n // bs + n // bs
    # and plain smoothing on a different noise stream takes the same decision
    plain = Smooth(model, 3, 0.25).certify(x, n0, n, alpha, bs, seed=1)
    assert plain[0] == res.prediction
    if plain[0] != ABSTAIN:
        assert abs(plain[1] - res.radius) < 0.15


def test_srs_one_step_warm_starts_are_cheap_and_state_restored():
    model, deq = small_deq(1)
    iters = []
    deq.register_forward_hook(lambda m, i, o: iters.append(m.last_stats.iterations))
    srs = SerializedSmooth(model, 3, 0.5, steps=1, audit_size=40, certificate="audit")
    res = srs.certify_detailed(torch.rand(1, 4, 4), 10, 200, 0.05, 40, seed=0)
    serial = iters[: 1 + 5]
    assert serial[0] > 1 and all(k <= 1 for k in serial[1:])  # warm-up solve, then 1 step each
    with torch.no_grad():  # context exited: a plain call solves from scratch again
        model(torch.rand(40, 1, 4, 4))
    assert iters[-1] > 1
    assert res.extra["audit_size"] == 40 and res.prediction in (ABSTAIN, 0, 1, 2)
