"""Exactness of the confidence bounds used by lirpa_deq.smoothing."""
import numpy as np
import pytest
from scipy.stats import binom, hypergeom
from statsmodels.stats.proportion import proportion_confint

from lirpa_deq.smoothing import binom_two_sided_p, cp_lower, cp_upper, hypergeom_upper


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (990, 1000), (5000, 10000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_cp_matches_statsmodels(k, n, alpha):
    lo, hi = proportion_confint(k, n, alpha=2 * alpha, method="beta")
    assert cp_lower(k, n, alpha) == pytest.approx(lo, abs=1e-12)
    assert cp_upper(k, n, alpha) == pytest.approx(hi, abs=1e-12)


@pytest.mark.parametrize("n,p", [(20, 0.3), (50, 0.9), (100, 0.97)])
def test_cp_lower_exact_coverage(n, p):
    """P(cp_lower(K) > p) <= alpha, computed exactly over K ~ Bin(n, p)."""
    alpha = 0.1
    ks = np.arange(n + 1)
    miss = sum(binom.pmf(k, n, p) for k in ks if cp_lower(int(k), n, alpha) > p)
    assert miss <= alpha + 1e-12


@pytest.mark.parametrize("population,draws", [(40, 1), (40, 10), (60, 15), (60, 60)])
@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_hypergeom_upper_exact_coverage(population, draws, alpha):
    """For every true count M: P(hypergeom_upper(D) < M) <= alpha, D ~ Hyp(population, M, draws)."""
    for m in range(population + 1):
        ds = np.arange(max(0, draws - (population - m)), min(draws, m) + 1)
        miss = sum(hypergeom.pmf(d, population, m, draws) for d in ds
                   if hypergeom_upper(int(d), population, draws, alpha) < m)
        assert miss <= alpha + 1e-12, (m, miss)


def test_hypergeom_upper_properties():
    assert hypergeom_upper(3, 100, 100, 0.01) == 3           # full audit: exact
    assert hypergeom_upper(0, 10000, 400, 0.0005) < 10000 * 8.0 / 400
    ups = [hypergeom_upper(d, 1000, 50, 0.05) for d in range(51)]
    assert ups == sorted(ups) and all(u >= d for d, u in enumerate(ups))
    with pytest.raises(ValueError):
        hypergeom_upper(5, 10, 4, 0.1)
    with pytest.raises(ValueError):
        hypergeom_upper(0, 10, 4, 1.0)


def test_binomial_p():
    assert binom_two_sided_p(5, 10) == pytest.approx(1.0)
    assert binom_two_sided_p(10, 10) == pytest.approx(2 * 0.5 ** 10)
