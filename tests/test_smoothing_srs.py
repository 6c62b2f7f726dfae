"""Serialized randomized smoothing: validity of the audited correction against adversarial fast models.

Converged base classifier: the threshold classifier of test_smoothing (known pA and true radius
t = sigma Phi^-1(pA) at x = 0).  The serialized "fast" predictor is an adversary that reports the
candidate class 0 for converged-class-1 samples, in patterns correlated across samples:

* ``BadBatches``: a random run of consecutive batches is entirely wrong-in-favour-of-0 (a stuck warm
  start); 30 % of the estimation batches are affected.
* ``NearBoundary``: every sample with t <= z < t + w is reported as 0 (errors correlated with the
  noise itself); the harmful fraction is Phi((t + w)/sigma) - Phi(t/sigma).

Without the audit correction these adversaries break the certificate most of the time, and even a
point-estimate correction (subtract n * observed audit disagreement rate) fails far more often than
alpha: both are checked below with the same binomial test, which shows the validity test has power.
With the audited confidence-bound correction the failure rate stays <= alpha.
"""
import contextlib

import pytest
import torch
from scipy.stats import binomtest, norm

from smoothing_helpers import Threshold, assert_rate_at_most

from lirpa_deq.smoothing import ABSTAIN, SerializedSmooth, Smooth, cp_lower

ALPHA = 0.1
SIGMA = 1.0


def assert_rate_above(failures, trials, alpha, level=1e-3):
    p = binomtest(int(failures), trials, alpha, alternative="greater").pvalue
    assert p < level, f"{failures}/{trials}: expected a rate significantly above {alpha} (p={p:.2g})"


class BadBatches:
    """Stateful fast model; ``context()`` starts a new serialized pass with a fresh bad window."""

    def __init__(self, base, n_calls, n_bad, seed=0):
        self.base, self.n_calls, self.n_bad = base, n_calls, n_bad
        self.gen = torch.Generator().manual_seed(seed)
        self.calls, self.bad = 0, range(0)

    @contextlib.contextmanager
    def context(self):
        start = int(torch.randint(1, self.n_calls - self.n_bad + 1, (1,), generator=self.gen))
        self.calls, self.bad = 0, range(start, start + self.n_bad)
        yield
        self.calls = -10**9  # calls outside the serialized pass are not expected

    def __call__(self, b):
        assert self.calls >= 0, "fast model called outside its serial context"
        logits = self.base(b)
        if self.calls in self.bad:
            logits = logits.clone()
            logits[:, 0] = 100.0
        self.calls += 1
        return logits


class NearBoundary:
    def __init__(self, t, w):
        self.t, self.w = t, w

    def __call__(self, b):
        z = b[:, 0]
        logits = Threshold(self.t)(b)
        flip = (z >= self.t) & (z < self.t + self.w)
        logits[flip, 0] = 100.0
        return logits


def _wrong(c, p_lower, t):
    return p_lower > 0.5 and ((c != 0) or SIGMA * norm.ppf(p_lower) > t)


def run(srs, t, reps, n, n0=20, batch_size=50):
    """Over `reps` certifications at x = 0: (failures, certified, naive_failures, point_est_failures).

    naive: fast counts used as if binomial; point_est: fast count minus n * (audit harmful rate).
    """
    failures = certified = naive = point = 0
    for seed in range(reps):
        res = srs.certify_detailed(torch.zeros(3), n0, n, ALPHA, batch_size, seed=seed)
        if res.prediction != ABSTAIN:
            certified += 1
            failures += (res.prediction != 0) or (res.radius > t)
        e = res.extra
        c = int(e["selection_counts"].argmax())
        naive += _wrong(c, cp_lower(e["n_fast"], n, ALPHA), t)
        est = max(0, e["n_fast"] - round(n * e["audit_harmful"] / e["audit_size"]))
        point += _wrong(c, cp_lower(est, n, ALPHA), t)
    return failures, certified, naive, point


@pytest.mark.parametrize("p_a", [0.75, 0.9])
def test_srs_valid_against_stuck_batches(p_a):
    t = SIGMA * norm.ppf(p_a)
    n, bs = 500, 50
    adv = BadBatches(Threshold(t), n_calls=1 + n // bs, n_bad=3)
    srs = SerializedSmooth(Threshold(t), 3, SIGMA, fast_model=adv, serial_context=adv.context, audit_size=100)
    reps = 400
    failures, certified, naive, point = run(srs, t, reps, n, batch_size=bs)
    assert certified > reps // 2
    assert_rate_at_most(failures, reps, ALPHA)
    assert_rate_above(naive, reps, ALPHA)  # the adversary is real
    assert_rate_above(point, reps, ALPHA)  # and a correction without confidence bound is caught


def test_srs_valid_against_noise_correlated_errors():
    p_a, w = 0.8, 0.4
    t = SIGMA * norm.ppf(p_a)
    harmful_fraction = norm.cdf(t + w) - norm.cdf(t)  # ~0.09 of all samples are wrongly counted as 0
    assert 0.05 < harmful_fraction < 0.15
    srs = SerializedSmooth(Threshold(t), 3, SIGMA, fast_model=NearBoundary(t, w), audit_size=150)
    reps = 400
    failures, certified, naive, point = run(srs, t, reps, n=600)
    assert certified > reps // 2
    assert_rate_at_most(failures, reps, ALPHA)
    assert_rate_above(naive, reps, ALPHA)
    assert_rate_above(point, reps, ALPHA)


def test_srs_valid_when_fast_equals_converged():
    p_a = 0.8
    t = SIGMA * norm.ppf(p_a)
    srs = SerializedSmooth(Threshold(t), 3, SIGMA, fast_model=Threshold(t), audit_size=50)
    failures, certified, _, _ = run(srs, t, 400, n=300)
    assert certified > 300
    assert_rate_at_most(failures, 400, ALPHA)


def test_srs_exact_fast_model_costs_little():
    """With a perfect fast model and a large audit, SRS nearly matches plain smoothing."""
    p_a = 0.99
    t = 0.5 * norm.ppf(p_a)
    plain = Smooth(Threshold(t), 3, 0.5).certify(torch.zeros(2), 100, 20000, 0.001, 1000, seed=0)
    srs = SerializedSmooth(Threshold(t), 3, 0.5, fast_model=Threshold(t), audit_size=2000)
    res = srs.certify_detailed(torch.zeros(2), 100, 20000, 0.001, 1000, seed=0)
    assert res.prediction == plain[0] == 0 and res.extra["audit_disagree"] == 0
    # same noise stream is not shared (audit draw comes first), so compare loosely: within 10 %
    assert 0.9 * plain[1] < res.radius <= t


def test_srs_full_audit_is_exact():
    """audit_size >= n: the converged count is known exactly (M_up = observed harmful count)."""
    p_a = 0.9
    t = SIGMA * norm.ppf(p_a)
    srs = SerializedSmooth(Threshold(t), 3, SIGMA, fast_model=NearBoundary(t, 0.5), audit_size=10**6)
    res = srs.certify_detailed(torch.zeros(3), 10, 200, 0.01, 64, seed=3)
    assert res.extra["audit_size"] == 200 and res.extra["harmful_upper"] == res.extra["audit_harmful"]
    # count equals the converged count on the same noise draws
    assert res.count == res.extra["n_fast"] - res.extra["audit_harmful"] + res.extra["audit_helpful"]
    assert res.extra["audit_harmful"] > 0 and res.count < res.extra["n_fast"]


def test_srs_batches_always_full_and_context_entered_once():
    shapes, entered = [], []

    @contextlib.contextmanager
    def ctx():
        entered.append(1)
        yield

    def fast(b):
        shapes.append(b.shape[0])
        return Threshold(0.3)(b)

    srs = SerializedSmooth(Threshold(0.3), 3, SIGMA, fast_model=fast, serial_context=ctx, audit_size=7)
    res = srs.certify_detailed(torch.zeros(3), 10, 95, 0.1, 32, seed=0)
    assert set(shapes) == {32} and len(shapes) == 1 + 3 and entered == [1]
    assert res.extra["audit_size"] == 7 and res.alpha == 0.1
    assert res.extra["alpha_1"] + res.extra["alpha_2"] == pytest.approx(0.1)


def test_srs_errors_and_default_context():
    m = Threshold(0.0)
    with pytest.raises(ValueError, match="steps"):
        SerializedSmooth(m, 3, 1.0, steps=0, fast_model=m)
    with pytest.raises(ValueError, match="audit_size"):
        SerializedSmooth(m, 3, 1.0, fast_model=m, audit_size=0)
    with pytest.raises(ValueError, match="audit_alpha_fraction"):
        SerializedSmooth(m, 3, 1.0, fast_model=m, audit_alpha_fraction=1.0)
    with pytest.raises(ValueError, match="sigma"):
        SerializedSmooth(m, 3, -0.5, fast_model=m)
    srs = SerializedSmooth(m, 3, 1.0, fast_model=m)
    with pytest.raises(ValueError, match="n0"):
        srs.certify(torch.zeros(3), 100, 50, 0.1)
    assert srs.predict(torch.zeros(3), 10, 0.1, seed=0) in (0, 1, ABSTAIN)  # converged PREDICT


def test_srs_abstains_on_low_confidence():
    t = SIGMA * norm.ppf(0.52)
    srs = SerializedSmooth(Threshold(t), 3, SIGMA, fast_model=NearBoundary(t, 0.3), audit_size=100)
    assert all(srs.certify(torch.zeros(3), 50, 500, 0.01, 100, seed=s) == (ABSTAIN, 0.0) for s in range(10))
