"""Agreement-certified SRS: the per-sample certificate never declares agreement when the exact DEQ
disagrees (random small DEQs, non-converged / garbage / adversarial states, scaled heads), and the
SRS certificate built on it fails at most at rate alpha even against an adversarial fast solver."""
import copy

import pytest
import torch
from scipy.stats import norm

from smoothing_helpers import assert_rate_at_most

from lirpa_deq.nn import DEQ, IBPMonLinear, MonLinear, OrthoLinear
from lirpa_deq.smoothing import ABSTAIN, SerializedSmooth, cp_lower
from lirpa_deq.smoothing.agreement import AgreementCertifier, split_deq_model
from lirpa_deq.smoothing.fastpath import AgreementPass


def small_model(kind, n=8, d=3, k=3, seed=0, head_scale=1.0, margin=0.3):
    torch.manual_seed(seed)
    cell = {"mon": lambda: MonLinear(n, m=margin), "ibp": lambda: IBPMonLinear(n, m=margin, similarity=True),
            "ortho": lambda: OrthoLinear(n, margin=margin)}[kind]()
    with torch.no_grad():
        for p in cell.parameters():
            p.mul_(1.5)  # far from the identity initialisation: slow, non-trivial fixed points
    model = torch.nn.Sequential(torch.nn.Linear(d, n), DEQ(cell, tol=1e-4, max_iter=200), torch.nn.Linear(n, k))
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model[2].weight.mul_(head_scale)
    return model.eval()


def exact_states(model, u):
    """Fixed points in float64 to 1e-12 (Peaceman-Rachford converges for every monotone cell)."""
    deq = copy.deepcopy(model[1]).double()
    deq.solver, deq.tol, deq.max_iter = "peaceman_rachford", 1e-12, 5000
    from lirpa_deq.solvers import get_solver
    deq._solver = get_solver("peaceman_rachford")
    with torch.no_grad():
        return deq(u.double())


@pytest.mark.parametrize("kind", ["mon", "ibp", "ortho"])
@pytest.mark.parametrize("head_scale", [1.0, 1e3])
def test_agreement_never_wrong(kind, head_scale):
    model = small_model(kind, head_scale=head_scale, seed=hash(kind) % 100)
    pre, deq, post = split_deq_model(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 3, generator=g)
    with torch.no_grad():
        u = pre(x)
    cert = AgreementCertifier(deq, post, u.shape[1:], u.device)
    z_star = exact_states(model, u)
    ref, ref_ok = cert.check(z_star, u)
    assert ref_ok.float().mean() > 0.9  # converged states are certified (the check has power)
    with torch.no_grad():
        op = deq.cell.operator()
        one_step = torch.relu(op.W(torch.zeros_like(u)) + u)
        a = post[0].weight.double()
        # adversarial: move z* straight towards the runner-up class until the label flips
        logits = z_star @ a.T + post[0].bias.double()
        top2 = logits.topk(2, dim=1).indices
        direction = (a[top2[:, 1]] - a[top2[:, 0]]).clamp_min(0)  # keeps the state >= 0
        gap = (logits.gather(1, top2[:, :1]) - logits.gather(1, top2[:, 1:])).squeeze(1)
        step = (1.01 * gap / direction.pow(2).sum(1))[:, None] * direction
        states = {"converged_f32": z_star.float(), "one_step": one_step, "garbage": 5 * torch.rand_like(u),
                  "adversarial": (z_star + step).float(), "tiny_push": (z_star + 1e-3 * step).float()}
    for name, z in states.items():
        lab, ok = cert.check(z, u)
        valid = ref_ok & ok
        assert torch.equal(lab[valid], ref[valid]), f"{name}: certified a wrong label"
    lab, ok = cert.check(states["adversarial"], u)
    flipped = lab != ref
    assert flipped.float().mean() > 0.5 and not (ok & flipped & ref_ok).any()


def test_split_and_certifier_errors():
    model = small_model("mon")
    assert split_deq_model(model) is not None
    assert split_deq_model(torch.nn.Sequential(*model, torch.nn.ReLU())) is None  # non-affine head
    srs = SerializedSmooth(model, 3, 0.5, steps=1)
    assert srs.certificate == "agreement"
    assert SerializedSmooth(model, 3, 0.5, certificate="audit").certificate == "audit"
    with pytest.raises(ValueError, match="agreement"):
        SerializedSmooth(torch.nn.Sequential(*model, torch.nn.ReLU()), 3, 0.5, certificate="agreement")
    with pytest.raises(ValueError, match="certificate"):
        SerializedSmooth(model, 3, 0.5, certificate="nope")


SIGMA, ALPHA = 0.5, 0.1


def _true_pa(model, x, c, n=200_000):
    g = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        u = model[0](x + SIGMA * torch.randn(n, 3, generator=g))
        z = exact_states(model, u)
        lab = (z @ model[2].weight.double().T + model[2].bias.double()).argmax(1)
    p = float((lab == c).double().mean())
    return p, (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("adversarial", [False, True])
def test_agreement_srs_valid(adversarial, monkeypatch):
    model = small_model("mon", seed=3)
    x = torch.tensor([0.0, 0.0, -3.0])  # pA ~ 0.93
    srs = SerializedSmooth(model, 3, SIGMA, steps=1)
    c = srs.certify(x, 50, 2000, 0.001, 200, seed=0)[0]
    assert c != ABSTAIN
    p, sd = _true_pa(model, x, c)
    assert 0.55 < p < 0.99
    t_hi = SIGMA * norm.ppf(min(p + 4 * sd, 1 - 1e-9))  # true radius, upper estimate
    if adversarial:  # every solve returns states pushed hard towards class c (chain and rescue)
        real = AgreementPass._solve_batch
        push = 50.0 * (model[2].weight[c] - model[2].weight.mean(0)).detach()

        def fake(self, u, z0, c_a):
            chain, fast, states, lab, proved, beyond = real(self, u, z0, c_a)
            chain = torch.relu(chain + push)
            if states is not None:
                states = torch.relu(states + push)
                lab = self.stop.labels(states)
            return chain, self.stop.labels(chain), states, lab, proved, beyond
        monkeypatch.setattr(AgreementPass, "_solve_batch", fake)
    reps, n = 150, 200
    failures = naive = 0
    for seed in range(reps):
        res = srs.certify_detailed(x, 20, n, ALPHA, 50, seed=seed)
        if res.prediction != ABSTAIN:
            failures += (res.prediction != c) or (res.radius > t_hi)
        naive += SIGMA * norm.ppf(max(cp_lower(res.extra["n_fast"], n, ALPHA), 0.5)) > t_hi
    assert_rate_at_most(failures, reps, ALPHA)
    if adversarial:
        assert naive > reps // 2  # the adversary is real: uncorrected fast counts overclaim


# ----------------------------------------------------------- review regressions (rounding, fallbacks)
def test_many_classes_with_nearly_equal_head_rows_are_not_certified_wrongly():
    """With > 25 classes torch.cdist's default computes distances by |a|^2 + |b|^2 - 2ab, which
    cancels to ~0 for long, nearly equal rows; the certificate must use exact differences."""
    K, L = 30, 1e8
    cell = MonLinear(2, m=0.5)
    with torch.no_grad():
        cell.A.zero_()
        cell.B.zero_()  # W = 0.5 I: z* = 2 relu(u)
    deq = DEQ(cell, tol=1e-6, max_iter=100)
    head = torch.nn.Linear(2, K)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:, 0] = L
        head.weight[1, 1] = 1e-2  # a_1 - a_0 = (0, 1e-2)
        head.bias.fill_(-1.0)
        head.bias[0], head.bias[1] = 1e-3, 0.0
    cert = AgreementCertifier(deq, torch.nn.Sequential(head), (2,), torch.device("cpu"))
    assert cert.D[0, 1].item() >= 1e-2 * (1 - 1e-6)
    labels, ok = cert.check(torch.zeros(1, 2), torch.tensor([[0.0, 1000.0]]))
    exact = (torch.tensor([[0.0, 2000.0]], dtype=torch.float64) @ head.weight.double().T + head.bias.double()).argmax(1)
    assert not (bool(ok[0]) and int(labels[0]) != int(exact[0]))


def test_cancellation_inside_a_multi_layer_head_is_covered():
    """Linear(bias 2^60, 1, -2^60) then a sum: float64 loses the 1 that decides the class."""
    torch.manual_seed(0)
    deq = DEQ(MonLinear(4, m=0.5), tol=1e-6, max_iter=200)
    l1, l2 = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    with torch.no_grad():
        l1.weight.zero_()
        l1.bias.copy_(torch.tensor([2.0 ** 60, 1.0, -2.0 ** 60]))
        l2.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
        l2.bias.copy_(torch.tensor([0.0, 0.5]))  # exact logits: l0 - l1 = +0.5 everywhere: f* = 0
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), deq, l1, l2).eval()
    srs = SerializedSmooth(model, 2, sigma=0.25, steps=1, certificate="agreement")
    res = srs.certify_detailed(torch.tensor([0.3, -0.2]), 100, 500, 0.01, 100, seed=0)
    assert res.prediction in (0, ABSTAIN)


def test_auto_falls_back_to_the_audit_with_a_warning_where_the_lemma_does_not_apply():
    from lirpa_deq.nn import TanhCell

    generic = torch.nn.Sequential(DEQ(TanhCell(4, 3)), torch.nn.Linear(4, 3)).eval()
    no_stats = torch.nn.Sequential(torch.nn.Linear(3, 4), DEQ(MonLinear(4)),
                                   torch.nn.BatchNorm1d(4, track_running_stats=False), torch.nn.Linear(4, 3)).eval()
    for model in (generic, no_stats):
        assert split_deq_model(model) is None
        with pytest.warns(UserWarning, match="uses the audited correction"):
            srs = SerializedSmooth(model, 3, sigma=0.25)
        assert srs.certificate == "audit"


def test_agreement_path_checks_the_model_output_shape():
    from lirpa_deq.nn import MonConv2d

    # AvgPool2d without Flatten: logits of shape (B, 2, 1, 1), which plain smoothing rejects too
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), DEQ(MonConv2d(2)), torch.nn.AvgPool2d(4)).eval()
    srs = SerializedSmooth(model, 2, sigma=0.25)
    assert srs.certificate == "agreement"
    with pytest.raises(ValueError, match="logits of shape"):
        srs.certify(torch.rand(1, 4, 4), 10, 20, 0.1, 10, seed=0)
