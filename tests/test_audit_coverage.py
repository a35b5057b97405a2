"""Coverage simulations (seeded, vectorised): every bound that can certify misses the true value in at most
α + 3 standard errors of the replications, over the families its support declares; the betting bound is
narrower than empirical Bernstein on the same data; the planning power is exact; the monitor's confidence
sequence survives 20 looks."""
import math

import numpy as np
import pytest
from scipy import stats

from safekd import constraints as C
from safekd.auditing.bounds import (BET_CAP, betting, betting_lambdas, betting_log_capital, betting_ratio_upper,
                                    clopper_pearson, empirical_bernstein)
from safekd.auditing.measure import bound_for_units
from safekd.auditing.monitor import CANNOT_BE_MET, CERTIFIED, ConfidenceSequence, ConstraintMonitor
from safekd.auditing.planning import max_expected_rate, pass_probability, plan_audit

ALPHA, REPS = 0.05, 400


def _ok(miss_rate: float, alpha: float = ALPHA, reps: int = REPS) -> bool:
    return miss_rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)


def _families(rng, reps, n):
    """Per-unit values in [0, 1] (one item per unit) and their true means."""
    mix = np.where(rng.random((reps, n)) < 0.9, 0.0, rng.random((reps, n)))
    return {
        "bernoulli(0.01)": ((rng.random((reps, n)) < 0.01).astype(float), 0.01),
        "bernoulli(0.002)": ((rng.random((reps, n)) < 0.002).astype(float), 0.002),
        "beta(2,20)": (rng.beta(2, 20, (reps, n)), 2 / 22),
        "two-point {0.2, 0.9}": (np.where(rng.random((reps, n)) < 0.3, 0.9, 0.2), 0.3 * 0.9 + 0.7 * 0.2),
        "90% zeros + U(0,1)": (mix, 0.05),
    }


@pytest.mark.parametrize("n", [50, 400])
def test_betting_upper_and_lower_bounds_cover_on_bounded_families(n):
    rng = np.random.default_rng(n)
    for name, (x, mu) in _families(rng, REPS, n).items():
        ones = np.ones_like(x)
        up = betting_ratio_upper(x, ones, ALPHA)
        low = 1.0 - betting_ratio_upper(1.0 - x, ones, ALPHA)
        assert _ok(float((up < mu).mean())), (name, "upper", (up < mu).mean())
        assert _ok(float((low > mu).mean())), (name, "lower", (low > mu).mean())
        assert np.all(low <= x.mean(1) + 1e-12) and np.all(x.mean(1) <= up + 1e-12)


def test_clopper_pearson_covers_small_rates():
    rng = np.random.default_rng(7)
    for p, n in ((0.002, 300), (0.01, 100), (0.05, 1000)):
        k = rng.binomial(n, p, size=4000)
        up = stats.beta.ppf(1 - ALPHA, k + 1, n - k)
        assert _ok(float((up < p).mean()), reps=4000)
        assert clopper_pearson(int(k[0]), n).value == pytest.approx(up[0])


def _clustered(rng, reps, n, length, p, icc):
    """Sequences with intra-class correlation: token outcomes Bernoulli(p_u), p_u ~ Beta with mean p and ICC."""
    a = p * (1 - icc) / icc
    b = (1 - p) * (1 - icc) / icc
    pu = rng.beta(a, b, (reps, n))
    return rng.binomial(length, pu).astype(float)


@pytest.mark.parametrize("icc", [0.05, 0.33])
def test_sequence_level_bound_covers_clustered_token_rates_where_token_level_cp_does_not(icc):
    rng = np.random.default_rng(int(icc * 100))
    n, T, p = 100, 32, 0.05
    v = _clustered(rng, REPS, n, T, p, icc)
    c = np.full_like(v, T)
    up = betting_ratio_upper(v, c, ALPHA)
    assert _ok(float((up < p).mean()))
    k = v.sum(1).astype(int)  # the flattened-token Clopper–Pearson the audit no longer does
    token_cp = stats.beta.ppf(1 - ALPHA, k + 1, n * T - k)
    assert (token_cp < p).mean() > 0.1  # well above α + 3 SE


def test_ratio_bound_covers_the_token_rate_with_variable_lengths():
    """Short sequences are riskier: the mean of per-sequence rates overstates nothing useful — the estimand is
    R = E[V]/E[C]; the ratio bound covers it, whatever the lengths."""
    rng = np.random.default_rng(11)
    n = 200
    lengths = rng.integers(1, 65, (REPS, n)).astype(float)
    p_of = lambda t: 0.02 + 0.2 * (t <= 8)  # noqa: E731
    v = rng.binomial(lengths.astype(int), p_of(lengths)).astype(float)
    t = np.arange(1, 65, dtype=float)
    token_rate = float((t * p_of(t)).sum() / t.sum())
    up = betting_ratio_upper(v, lengths, ALPHA)
    assert _ok(float((up < token_rate).mean()))
    low = 1.0 - betting_ratio_upper(lengths - v, lengths, ALPHA)
    assert _ok(float((low > token_rate).mean()))
    # the audit path (seeded permutation, support scaling) agrees with the vectorised form on one replication
    b = bound_for_units(v[0], lengths[0], "<=", 0.95, "binary", seed=0)
    order = np.random.default_rng(0).permutation(n)
    assert b.value == pytest.approx(float(betting_ratio_upper(v[0][order], lengths[0][order], ALPHA)), abs=1e-12)


def test_declared_support_scales_a_rare_large_metric_validly():
    """A metric equal to 50 with probability 0.005 (mean 0.25), declared on [0, 50]: the bound covers it."""
    rng = np.random.default_rng(5)
    n, mu = 100, 0.25
    x = np.where(rng.random((REPS, n)) < 0.005, 50.0, 0.0)
    up = 50.0 * betting_ratio_upper(x / 50.0, np.ones_like(x), ALPHA)
    assert _ok(float((up < mu).mean()))
    one = bound_for_units(x[0], np.ones(n), "<=", 0.95, (0.0, 50.0), seed=1)
    assert one.value >= one.estimate and one.method.startswith("betting")


def test_bisection_finds_the_first_rejected_rate_on_a_grid():
    rng = np.random.default_rng(3)
    x = rng.beta(2, 30, 300)
    w = np.ones_like(x)
    lam, _ = betting_lambdas(x, w, ALPHA)
    u = float(betting_ratio_upper(x, w, ALPHA))
    grid = np.linspace(0, 0.5, 20001)
    cap = betting_log_capital(grid, x, w, lam)
    first = grid[np.argmax(cap >= math.log(1 / ALPHA))]
    assert abs(u - first) <= 2.5e-5 and np.all(np.diff(cap) >= -1e-12)  # K increases in r
    assert np.all(lam <= BET_CAP) and np.all(lam > 0)


@pytest.mark.parametrize("n", [100, 1000, 10000])
def test_betting_is_narrower_than_empirical_bernstein_on_the_same_data(n):
    rng = np.random.default_rng(n + 1)
    for name, (x, _) in _families(rng, 3, n).items():
        if name == "bernoulli(0.002)" and n < 1000:
            continue  # mostly all-zero draws: both bounds are dominated by their constant terms
        for row in x:
            b, e = betting(row, confidence=0.95, seed=0), empirical_bernstein(row, 0.95)
            assert b.value - b.estimate < e.value - e.estimate, (name, n, b.value, e.value)


def test_planning_power_is_the_exact_pass_probability():
    n, thr, p0 = 452, 0.04, 0.02
    prob = pass_probability(n, thr, p0)
    k = np.random.default_rng(0).binomial(n, p0, 20000)
    sim = float((stats.beta.ppf(0.95, k + 1, n - k) <= thr).mean())
    assert prob == pytest.approx(sim, abs=4 * math.sqrt(prob * (1 - prob) / 20000))
    plan = plan_audit(thr, p0)
    assert plan.units == n and plan.power >= 0.8 and pass_probability(n - 1, thr, p0) < 0.8
    assert plan_audit(0.01, 0.0).units == 299  # zero events: 1 − α^{1/n} ≤ ε
    assert math.isnan(max_expected_rate(1024, 0.0015))  # 1,024 documents cannot certify 0.0015 at all
    m = max_expected_rate(100_000, 0.0015)
    assert 0.0011 < m < 0.0015 and pass_probability(100_000, 0.0015, m) >= 0.8


def test_planning_validates_its_arguments():
    with pytest.raises(ValueError, match="strictly inside"):
        plan_audit(0.01, 0.02)
    with pytest.raises(ValueError, match="power"):
        plan_audit(0.01, 0.0, power=1.0)
    with pytest.raises(ValueError, match="threshold"):
        plan_audit(1.5, 0.0)
    assert plan_audit(0.9, 0.95, direction=">=").units == plan_audit(0.1, 0.05).units


def test_confidence_sequence_miss_rate_under_20_looks_is_at_most_alpha():
    """Worst case for a false PASS: the true rate sits exactly at the threshold. Looking after each of 20 batches,
    the monitor may certify only if its upper bound drops below the truth — at most α of the time."""
    rng = np.random.default_rng(20)
    reps, looks, batch, p = 300, 20, 50, 0.05
    misses_cs = misses_cp = 0
    at_threshold = C.unsafe_rate(p, unsafe=[0], name="u")
    for _ in range(reps):
        mon = ConstraintMonitor([at_threshold], confidence=1 - ALPHA, grid_points=96)
        x = (rng.random(looks * batch) < p).astype(float)
        missed = cp_missed = False
        for t in range(looks):
            mon.update("u", x[t * batch:(t + 1) * batch], np.ones(batch))
            missed |= mon.status()["u"].status == CERTIFIED  # a false PASS
            k, n = int(x[:(t + 1) * batch].sum()), (t + 1) * batch
            cp_missed |= stats.beta.ppf(1 - ALPHA, k + 1, n - k) < p  # a fixed-n bound, looked at 20 times
        misses_cs += missed
        misses_cp += cp_missed
    assert _ok(misses_cs / reps, reps=reps)
    assert misses_cp / reps > misses_cs / reps  # repeated looks inflate the fixed-n bound's error
    cs = ConfidenceSequence(ALPHA, grid_points=96)
    cs.update(np.zeros(500), np.ones(500))
    assert cs.lower == 0.0 and cs.upper < 0.02 and cs.n == 500


def test_monitor_certifies_a_safe_stream_early_and_flags_an_unattainable_one():
    safe = C.unsafe_rate(0.1, unsafe=[0], name="safe")
    bad = C.retain("accuracy", 0.9, name="acc")
    mon = ConstraintMonitor([safe, bad], confidence=0.95, grid_points=300)
    rng = np.random.default_rng(0)
    for _ in range(40):
        mon.update("safe", rng.beta(1, 99, 100), np.ones(100))  # mean 0.01 ≪ 0.1
        mon.update("acc", (rng.random(100) < 0.7).astype(float), np.ones(100))  # 0.7 ≪ 0.9
        if mon.status()["safe"].status == CERTIFIED and mon.failing:
            break
    s = mon.status()
    assert s["safe"].status == CERTIFIED and s["safe"].upper <= 0.1 and s["safe"].n <= 1000
    assert s["acc"].status == CANNOT_BE_MET and s["acc"].upper < 0.9 and mon.failing == ["acc"]
    assert not mon.all_certified
    with pytest.raises(ValueError, match="max_unit_count"):
        mon.update("safe", np.array([0.5]), np.array([3.0]))
    with pytest.raises(ValueError, match="no support"):
        ConstraintMonitor([C.kl_to("t", 1.0)])
