"""Confidence bounds: exact Clopper–Pearson against scipy, empirical Bernstein by formula and coverage."""
import math

import numpy as np
import pytest
from scipy import stats

from safekd.auditing.bounds import (
    CLOPPER_PEARSON,
    EMPIRICAL_BERNSTEIN,
    clopper_pearson,
    empirical_bernstein,
)


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (9, 10), (10, 10), (3, 997), (0, 1), (40, 1797)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_clopper_pearson_matches_scipy_exact(k, n, confidence):
    # one-sided at c == matching end of the two-sided exact interval at 1 - 2(1 - c)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * (1 - confidence), method="exact")
    up = clopper_pearson(k, n, confidence, "upper")
    lo = clopper_pearson(k, n, confidence, "lower")
    assert up.value == pytest.approx(ci.high, abs=1e-12)
    assert lo.value == pytest.approx(ci.low, abs=1e-12)
    assert up.estimate == pytest.approx(k / n)
    assert up.method == CLOPPER_PEARSON and up.n == n and up.count == k
    assert lo.value <= k / n <= up.value


def test_clopper_pearson_tail_probability_is_alpha():
    k, n, c = 7, 200, 0.95
    u = clopper_pearson(k, n, c).value
    assert stats.binom.cdf(k, n, u) == pytest.approx(1 - c, rel=1e-9)


def test_clopper_pearson_rejects_bad_input():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson(5, 3)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson(1, 3, confidence=1.0)
    with pytest.raises(ValueError, match="side"):
        clopper_pearson(1, 3, side="both")
    assert clopper_pearson(0, 0).value == 1.0 and math.isnan(clopper_pearson(0, 0).estimate)


def test_empirical_bernstein_formula():
    rng = np.random.default_rng(0)
    x = rng.beta(2, 8, size=500)
    c = 0.95
    log_term = math.log(2 / (1 - c))
    width = math.sqrt(2 * x.var(ddof=1) * log_term / x.size) + 7 * log_term / (3 * (x.size - 1))
    up = empirical_bernstein(x, c, "upper")
    lo = empirical_bernstein(x, c, "lower")
    assert up.value == pytest.approx(x.mean() + width)
    assert lo.value == pytest.approx(x.mean() - width)
    assert up.method == EMPIRICAL_BERNSTEIN


def test_empirical_bernstein_coverage():
    # vectorised Monte Carlo: the upper bound must cover the true mean in >= 95% of draws
    rng = np.random.default_rng(1)
    reps, n, c = 4000, 60, 0.95
    x = rng.beta(1, 9, size=(reps, n))  # true mean 0.1
    log_term = math.log(2 / (1 - c))
    ub = x.mean(1) + np.sqrt(2 * x.var(1, ddof=1) * log_term / n) + 7 * log_term / (3 * (n - 1))
    assert (ub >= 0.1).mean() >= c
    # and the library agrees with this vectorised form on one draw
    assert empirical_bernstein(x[0], c).value == pytest.approx(min(1.0, ub[0]))


def test_empirical_bernstein_validates_and_is_vacuous_when_tiny():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        empirical_bernstein(np.array([0.2, 1.5]))
    with pytest.raises(ValueError, match="finite"):
        empirical_bernstein(np.array([0.2, np.nan]))
    assert empirical_bernstein(np.array([0.3]), side="upper").value == 1.0
    assert empirical_bernstein(np.array([0.3]), side="lower").value == 0.0


def test_bootstrap_bound_is_seeded_and_brackets_the_mean():
    from safekd.auditing.bounds import BOOTSTRAP, bootstrap

    x = np.random.default_rng(2).exponential(2.0, size=300)  # unbounded values (e.g. a KL)
    up, lo = bootstrap(x, None, 0.95, "upper", seed=3), bootstrap(x, None, 0.95, "lower", seed=3)
    assert up.method == BOOTSTRAP and lo.value < x.mean() < up.value
    assert not up.certifies and (up.seed, up.resamples) == (3, 2000)
    assert up.value == bootstrap(x, None, 0.95, "upper", seed=3).value
    # close to the normal-theory one-sided bound for a mean of 300 draws
    assert up.value == pytest.approx(x.mean() + 1.645 * x.std(ddof=1) / np.sqrt(x.size), rel=0.03)
