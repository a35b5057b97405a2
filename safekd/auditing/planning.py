"""Audit planning: how many held-out units a threshold needs, and the training margin a unit count allows.

For a 0/1 outcome per unit with true rate ``p₀`` and an upper threshold ``ε``, the audit passes when the
Clopper–Pearson bound ``U(k, n) ≤ ε``, i.e. (by the binomial–beta duality) when ``P(Bin(n, ε) ≤ k) ≤ α``. So
with ``k_max(n)`` the largest such ``k``, the probability of passing is exactly
``power(n) = P(Bin(n, p₀) ≤ k_max(n))`` — computed, not simulated. ``≥`` thresholds (``accuracy ≥ 0.9``) are the
same problem for the complementary rate. Power is a saw-tooth in ``n`` (``k`` is an integer); the plan reports
the smallest ``n`` found with the requested power and the power it has. Zero events: ``U = 1 − α^{1/n}``, so
``ε = 0.01`` needs ``n ≥ 299`` at ``α = 0.05`` even for a perfect student.

Bounded means and token rates use the betting bound, which is never tighter than Clopper–Pearson on 0/1 data;
plan them with this function as a lower bound on the units needed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats

from safekd.auditing.bounds import check_level

__all__ = ["AuditPlan", "plan_audit", "pass_probability", "max_expected_rate"]


@dataclass(frozen=True)
class AuditPlan:
    """``units`` held-out units give probability ``power`` of a PASS for a student whose true rate is
    ``expected_rate`` (``margin = |threshold − expected_rate|`` is the training margin this assumes)."""

    units: int
    power: float
    threshold: float
    expected_rate: float
    direction: str
    confidence: float
    target_power: float
    method: str = "clopper-pearson (exact binomial power)"

    @property
    def margin(self) -> float:
        return abs(self.threshold - self.expected_rate)

    def to_dict(self) -> dict:
        return {**asdict(self), "margin": self.margin}

    def __str__(self) -> str:
        return (f"{self.units} held-out units: a student at {self.expected_rate:g} passes '{self.direction} "
                f"{self.threshold:g}' at {self.confidence:g} confidence with probability {self.power:.3f} "
                f"(target {self.target_power:g}; training margin {self.margin:g}; {self.method})")


def _upper_problem(threshold: float, expected_rate: float, direction: str) -> tuple[float, float]:
    """(ε, p₀) for the upper-bound problem (``≥`` is mapped to the complementary rate)."""
    if direction not in ("<=", ">="):
        raise ValueError(f"direction must be '<=' or '>=', got {direction!r}")
    for name, x in (("threshold", threshold), ("expected_rate", expected_rate)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= float(x) <= 1.0:
            raise ValueError(f"{name} must be a rate in [0, 1], got {x!r}")
    eps, p0 = (threshold, expected_rate) if direction == "<=" else (1.0 - threshold, 1.0 - expected_rate)
    if not p0 < eps:
        raise ValueError(f"expected_rate {expected_rate:g} must be strictly inside the threshold ({direction} "
                         f"{threshold:g}): a student at the threshold passes with probability at most 1 − confidence")
    return float(eps), float(p0)


def _check(confidence: float, power: float) -> float:
    check_level(power, "power")
    return 1.0 - check_level(confidence)


def _power(n: np.ndarray, eps: float, p0: float, alpha: float) -> np.ndarray:
    """P(pass) at each ``n`` (vectorised): ``P(Bin(n, p₀) ≤ k_max(n))``, ``k_max = max{k : P(Bin(n, ε) ≤ k) ≤ α}``."""
    n = np.asarray(n, dtype=np.int64)
    k0 = stats.binom.ppf(alpha, n, eps)  # smallest k with cdf ≥ α
    k_max = np.where(stats.binom.cdf(k0, n, eps) <= alpha, k0, k0 - 1)
    return np.where(k_max >= 0, stats.binom.cdf(k_max, n, p0), 0.0)


def pass_probability(units: int, threshold: float, expected_rate: float, *, confidence: float = 0.95,
                     direction: Literal["<=", ">="] = "<=") -> float:
    """Exact probability that a Clopper–Pearson audit on ``units`` units passes a student at ``expected_rate``."""
    eps, p0 = _upper_problem(threshold, expected_rate, direction)
    alpha = _check(confidence, 0.5)
    if int(units) != units or units < 1:
        raise ValueError(f"units must be an integer >= 1, got {units!r}")
    return float(_power(np.array([units]), eps, p0, alpha)[0])


def plan_audit(threshold: float, expected_rate: float, *, confidence: float = 0.95, power: float = 0.8,
               direction: Literal["<=", ">="] = "<=", max_units: int = 10**9) -> AuditPlan:
    """Smallest number of held-out units with which a student at ``expected_rate`` passes ``direction threshold``
    with probability ≥ ``power`` (Clopper–Pearson at one-sided ``confidence``).

    Raises:
        ValueError: a bad argument, or when more than ``max_units`` units would be needed.
    """
    eps, p0 = _upper_problem(threshold, expected_rate, direction)
    alpha = _check(confidence, power)
    hi = 1
    while _power(np.array([hi]), eps, p0, alpha)[0] < power:  # doubling: the envelope of power grows with n
        hi *= 2
        if hi > 2 * max_units:
            raise ValueError(f"more than {max_units} units are needed for {direction} {threshold:g} at expected rate "
                             f"{expected_rate:g}; widen the margin (train to a lower rate) or lower the confidence")
    lo = hi // 2
    while hi - lo > 1024:  # bisection to a window, then every n of the window (power is a saw-tooth)
        mid = (lo + hi) // 2
        if _power(np.array([mid]), eps, p0, alpha)[0] >= power:
            hi = mid
        else:
            lo = mid
    n = np.arange(max(1, lo - 1024), hi + 1)
    pw = _power(n, eps, p0, alpha)
    i = int(np.flatnonzero(pw >= power)[0])
    return AuditPlan(units=int(n[i]), power=float(pw[i]), threshold=float(threshold), expected_rate=float(expected_rate),
                     direction=direction, confidence=float(confidence), target_power=float(power))


def max_expected_rate(units: int, threshold: float, *, confidence: float = 0.95, power: float = 0.8,
                      direction: Literal["<=", ">="] = "<=") -> float:
    """The least safe true rate that still passes with probability ≥ ``power`` on ``units`` units: train to it,
    i.e. ``margin = |threshold − max_expected_rate|``. NaN when even a perfect student would not pass."""
    alpha = _check(confidence, power)
    _upper_problem(threshold, 0.0 if direction == "<=" else 1.0, direction)
    if int(units) != units or units < 1:
        raise ValueError(f"units must be an integer >= 1, got {units!r}")
    eps = threshold if direction == "<=" else 1.0 - threshold
    n = np.array([int(units)])
    if _power(n, eps, 0.0, alpha)[0] < power:
        return math.nan
    lo, hi = 0.0, eps  # power decreases in p₀
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _power(n, eps, mid, alpha)[0] >= power else (lo, mid)
    return lo if direction == "<=" else 1.0 - lo
