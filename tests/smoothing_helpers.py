"""Shared by the smoothing tests: a base classifier with KNOWN class probabilities, and binomial
tests on failure rates."""
import torch
from scipy.stats import binomtest


class Threshold:
    """Converged classifier: class 0 iff z[0] < t, class 1 otherwise (class 2 never)."""

    def __init__(self, t):
        self.t = t

    def __call__(self, b):
        z = b.reshape(b.shape[0], -1)[:, 0]
        return torch.stack([self.t - z, z - self.t, torch.full_like(z, -10.0)], dim=1)


def assert_rate_at_most(failures, trials, alpha, level=1e-3):
    """Binomial test of H0: failure rate <= alpha; fails the test only if H0 is rejected at `level`."""
    p = binomtest(int(failures), trials, alpha, alternative="greater").pvalue
    assert p > level, f"{failures}/{trials} failures: rate significantly above alpha={alpha} (p={p:.2g})"
