"""Cohen et al. smoothing: statistical validity on a classifier with KNOWN class probabilities, API errors.

Synthetic base classifier: f(z) = 0 if z[0] < t else 1 (a third class is never predicted).
At x = 0 with noise N(0, sigma^2 I): pA = P(f(x+d) = 0) = Phi(t / sigma).  The smoothed classifier
predicts 0 exactly on {x' : x'[0] < t}, so the TRUE certified radius at x = 0 is t = sigma Phi^-1(pA).
A certificate is wrong if it names another class, or a radius > t.
"""
import math

import pytest
import torch
from scipy.stats import norm

from smoothing_helpers import Threshold, assert_rate_at_most

from lirpa_deq.smoothing import ABSTAIN, Smooth

ALPHA = 0.1


@pytest.mark.parametrize("p_a,sigma,n", [(0.8, 1.0, 200), (0.97, 0.5, 300)])
def test_certify_validity_known_probabilities(p_a, sigma, n):
    t = sigma * norm.ppf(p_a)
    smooth = Smooth(Threshold(t), 3, sigma)
    x = torch.zeros(4)
    reps, failures, certified = 800, 0, 0
    for seed in range(reps):
        c, r = smooth.certify(x, n0=20, n=n, alpha=ALPHA, batch_size=128, seed=seed)
        if c != ABSTAIN:
            certified += 1
            failures += (c != 0) or (r > t)
    assert certified > reps // 2  # the check is about real certificates, not abstentions
    assert_rate_at_most(failures, reps, ALPHA)


def test_certify_radius_close_to_truth_with_many_samples():
    sigma, p_a = 0.25, 0.99
    t = sigma * norm.ppf(p_a)
    c, r = Smooth(Threshold(t), 3, sigma).certify(torch.zeros(2), 100, 100000, 0.001, 10000, seed=0)
    assert c == 0 and 0.9 * t < r <= t


def test_predict_validity_and_abstain():
    sigma = 1.0
    x = torch.zeros(3)
    smooth = Smooth(Threshold(sigma * norm.ppf(0.6)), 3, sigma)  # g(x) = 0 with pA = 0.6
    wrong = sum(smooth.predict(x, 50, ALPHA, 50, seed=s) not in (0, ABSTAIN) for s in range(400))
    assert_rate_at_most(wrong, 400, ALPHA)
    # a coin-flip input: PREDICT abstains on most seeds, and wrong answers stay rare
    coin = Smooth(Threshold(0.0), 3, sigma)
    answers = [coin.predict(x, 100, 0.05, 100, seed=s) for s in range(200)]
    assert answers.count(ABSTAIN) >= 150
    assert smooth.predict(x, 5000, 0.001, 1000, seed=0) == 0


def test_certify_abstains_on_low_confidence():
    sigma = 0.5
    smooth = Smooth(Threshold(sigma * norm.ppf(0.52)), 3, sigma)
    results = [smooth.certify(torch.zeros(2), 50, 500, 0.001, 250, seed=s) for s in range(20)]
    assert all(r == (ABSTAIN, 0.0) for r in results)


def test_seed_determinism_and_generator():
    smooth = Smooth(Threshold(0.5), 3, 1.0)
    x = torch.zeros(3)
    assert smooth.certify(x, 10, 100, 0.1, 32, seed=7) == smooth.certify(x, 10, 100, 0.1, 32, seed=7)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert smooth.certify(x, 10, 100, 0.1, 32, generator=g1) == smooth.certify(x, 10, 100, 0.1, 32, generator=g2)
    d = smooth.certify_detailed(x, 10, 100, 0.1, 100, seed=1)
    assert d.n == 100 and d.extra["counts"].sum() == 100 and d.count == d.extra["counts"][max(d.prediction, 0)]


def test_noise_on_input_device_and_dtype():
    seen = []

    def model(b):
        seen.append((b.device, b.dtype, tuple(b.shape)))
        return torch.zeros(b.shape[0], 3, dtype=b.dtype, device=b.device)

    Smooth(model, 3, 0.5).certify(torch.zeros(2, 5, dtype=torch.float64), 3, 7, 0.1, 4, seed=0)
    assert {s[:2] for s in seen} == {(torch.device("cpu"), torch.float64)}
    assert [s[2][0] for s in seen] == [3, 4, 3] and all(s[2][1:] == (2, 5) for s in seen)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"), (dict(sigma=float("nan")), "sigma"),
    (dict(num_classes=1), "num_classes"), (dict(num_classes=2.5), "num_classes"),
])
def test_constructor_errors(kwargs, match):
    args = dict(model=Threshold(0.0), num_classes=3, sigma=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Smooth(**args)


@pytest.mark.parametrize("call,match", [
    (dict(n0=0), "n0"), (dict(n=0), "n "), (dict(n0=100, n=10), "n0"), (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(batch_size=0), "batch_size"),
    (dict(n=10.5), "n "),
])
def test_certify_argument_errors(call, match):
    args = dict(n0=5, n=20, alpha=0.1, batch_size=8)
    args.update(call)
    with pytest.raises(ValueError, match=match):
        Smooth(Threshold(0.0), 3, 1.0).certify(torch.zeros(3), **args)


def test_single_input_checks():
    strict = Smooth(Threshold(0.0), 3, 1.0, input_shape=(1, 4))
    assert strict.certify(torch.zeros(1, 1, 4), 5, 10, 0.1, 5, seed=0)[0] in (0, 1, ABSTAIN)  # (1, *shape) ok
    with pytest.raises(ValueError, match="single input"):
        strict.certify(torch.zeros(8, 1, 4), 5, 10, 0.1, 5)
    loose = Smooth(torch.nn.Linear(4, 3), 3, 1.0)
    with pytest.raises(ValueError, match="single input without batch"):
        loose.certify(torch.zeros(8, 4), 5, 10, 0.1, 5)  # a batch -> logits (B, 8, 3), caught
    with pytest.raises(ValueError, match="one non-empty input"):
        loose.predict(torch.tensor(1.0), 10, 0.1)
    with pytest.raises(ValueError, match="torch.Tensor"):
        loose.predict([0.0] * 4, 10, 0.1)
    with pytest.raises(ValueError, match="seed or generator"):
        loose.predict(torch.zeros(4), 10, 0.1, seed=1, generator=torch.Generator())


def test_radius_formula():
    smooth = Smooth(Threshold(10.0), 3, 0.7)  # always class 0
    res = smooth.certify_detailed(torch.zeros(2), 10, 1000, 0.01, 500, seed=0)
    assert res.count == 1000 and res.p_lower == pytest.approx(0.01 ** (1 / 1000))
    assert res.radius == pytest.approx(0.7 * norm.ppf(res.p_lower)) and math.isfinite(res.radius)


# ------------------------------------------------------------------------------------ refused input
def test_nan_input_is_refused_not_certified():
    """Unchecked, the argmax of NaN logits is class 0 for every sample, so a NaN input would be
    'certified' as class 0 with radius ~0.42 (sigma 0.25, n 100)."""
    from lirpa_deq.smoothing import SerializedSmooth

    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x = torch.full((1, 8, 8), float("nan"))
    msg = "x contains 64 NaN and 0 infinite values: nothing can be certified about them; clean or drop those inputs"
    for sm in (Smooth(linear, 10, 0.25, input_shape=(1, 8, 8)),
               SerializedSmooth(Threshold(0.0), 3, 0.25, fast_model=Threshold(0.0), audit_size=10)):
        for call in (lambda: sm.certify(x, 10, 100, 0.01, seed=0), lambda: sm.predict(x, 100, 0.01, seed=0)):
            with pytest.raises(ValueError) as info:
                call()
            assert str(info.value) == msg
    with pytest.raises(ValueError, match="x contains 0 NaN and 1 infinite values"):
        Smooth(Threshold(0.0), 3, 1.0).certify(torch.tensor([0.0, float("inf")]), 5, 10, 0.1)


def test_input_dtype_and_device_must_match_the_model():
    linear = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError) as info:
        Smooth(linear, 3, 0.5).certify(torch.zeros(4, dtype=torch.float64), 5, 10, 0.1, seed=0)
    assert str(info.value) == "x is float64 but the model's parameters are float32; use x.float() or model.double()"
    c, r = Smooth(linear.double(), 3, 0.5).certify(torch.zeros(4, dtype=torch.float64), 5, 10, 0.1, seed=0)
    assert c in (0, 1, 2, ABSTAIN) and r >= 0


def test_swapped_sample_sizes_message():
    with pytest.raises(ValueError) as info:
        Smooth(Threshold(0.0), 3, 1.0).certify(torch.zeros(3), n0=100, n=10, alpha=0.1)
    assert str(info.value).startswith("n (estimation samples, 10) must be >= n0 (selection samples, 100)")
    with pytest.raises(ValueError, match="sigma must be a positive finite number, got inf"):
        Smooth(Threshold(0.0), 3, float("inf"))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 2.0"):
        Smooth(Threshold(0.0), 3, 1.0).predict(torch.zeros(3), 10, 0.1, batch_size=2.0)
