"""Exact confidence bounds used by randomized-smoothing certification.

All bounds are one-sided and exact (conservative), not asymptotic:

* :func:`cp_lower` / :func:`cp_upper` -- Clopper-Pearson bounds on a binomial proportion:
  if ``K ~ Binomial(n, p)`` then ``P(cp_lower(K, n, a) > p) <= a`` and ``P(cp_upper(K, n, a) < p) <= a``.
* :func:`hypergeom_upper` -- upper confidence bound on the number ``M`` of marked items in a finite
  population of size ``N`` from the number ``d`` of marked items in a uniformly random sample of
  ``k`` items drawn without replacement: ``P(hypergeom_upper(d, N, k, a) < M) <= a`` for every
  fixed ``M`` (hence also for a random ``M`` independent of the sample's positions).
* :func:`binom_two_sided_p` -- the two-sided exact binomial test p-value used by PREDICT.
"""
from __future__ import annotations

import math

from scipy.stats import beta, binomtest, hypergeom


def _check_alpha(alpha: float) -> None:
    if not (0.0 < alpha < 1.0) or math.isnan(alpha):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _check_count(k: int, n: int) -> None:
    if n < 1 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")


def cp_lower(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound at level ``alpha`` on p, from k successes in n trials."""
    _check_alpha(alpha)
    _check_count(k, n)
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def cp_upper(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound at level ``alpha`` on p, from k successes in n trials."""
    _check_alpha(alpha)
    _check_count(k, n)
    return 1.0 if k == n else float(beta.ppf(1.0 - alpha, k + 1, n - k))


def hypergeom_upper(d: int, population: int, draws: int, alpha: float) -> int:
    """Largest M still compatible (at level ``alpha``) with seeing ``d`` marked items in the sample.

    Returns ``max{M in [d, population - (draws - d)] : P(Hyp(population, M, draws) <= d) > alpha}``.
    ``P(Hyp(N, M, k) <= d)`` is non-increasing in M, so the set of compatible M is an interval and
    is found by bisection.  Guarantee: for every fixed M, ``P_M(hypergeom_upper(D, N, k, a) < M)
    = P_M(F_M(D) <= a) <= a`` with ``D ~ Hyp(N, M, k)`` and ``F_M`` its CDF.
    """
    _check_alpha(alpha)
    if not (1 <= draws <= population) or not (0 <= d <= draws):
        raise ValueError(f"need 0 <= d <= draws <= population, draws >= 1; got d={d}, draws={draws}, "
                         f"population={population}")
    lo, hi = d, population - (draws - d)  # lo is always compatible: P(X <= d | M = d) = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if hypergeom.cdf(d, population, mid, draws) > alpha:
            lo = mid
        else:
            hi = mid - 1
    return int(lo)


def binom_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided binomial test p-value of ``k`` successes in ``n`` trials against p = 1/2."""
    _check_count(k, n)
    return float(binomtest(k, n, 0.5, alternative="two-sided").pvalue)
