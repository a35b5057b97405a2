"""One-sided confidence bounds used by the audit.

Two estimators, each returning a :class:`Bound` that says which method produced it:

- **Clopper–Pearson** (exact, for count-based rates ``k/n``). The one-sided upper bound at confidence
  ``1-α`` is the ``p`` at which ``P(X ≤ k | n, p) = α``, i.e. ``U = Beta.ppf(1-α; k+1, n-k)`` (``U = 1`` when
  ``k = n``); the lower bound is ``L = Beta.ppf(α; k, n-k+1)`` (``L = 0`` when ``k = 0``). A one-sided bound at
  ``1-α`` equals the matching end of the two-sided exact interval at ``1-2α``.
- **Maurer–Pontil empirical Bernstein** (for means of i.i.d. values in ``[0, 1]``; Maurer & Pontil 2009, Thm 4):
  with probability at least ``1-α``, ``E[X] ≤ X̄ + sqrt(2 V ln(2/α) / n) + 7 ln(2/α) / (3 (n-1))`` where ``V`` is the
  unbiased sample variance; the lower bound is symmetric. Bounds are clipped to ``[0, 1]``.
- **Percentile bootstrap** (approximate, for means of unbounded values such as a KL divergence, where no
  distribution-free finite-sample bound applies): the ``1-α`` (upper) or ``α`` (lower) quantile of the means of
  ``resamples`` seeded resamples with replacement.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats

__all__ = [
    "Bound",
    "CLOPPER_PEARSON",
    "EMPIRICAL_BERNSTEIN",
    "clopper_pearson",
    "empirical_bernstein",
    "bootstrap",
    "BOOTSTRAP",
    "bound_in_safe_direction",
]

CLOPPER_PEARSON = "clopper-pearson"
EMPIRICAL_BERNSTEIN = "empirical-bernstein (Maurer-Pontil 2009)"
BOOTSTRAP = "percentile-bootstrap (approximate)"

Side = Literal["upper", "lower"]


@dataclass(frozen=True)
class Bound:
    """A one-sided confidence bound on a rate or a bounded mean.

    ``value`` is the bound itself: with probability ≥ ``confidence`` the true quantity is ≤ ``value``
    (``side="upper"``) or ≥ ``value`` (``side="lower"``).
    """

    estimate: float
    value: float
    side: Side
    confidence: float
    method: str
    n: int
    count: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _check_confidence(confidence: float) -> float:
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def _check_side(side: str) -> None:
    if side not in ("upper", "lower"):
        raise ValueError(f"side must be 'upper' or 'lower', got {side!r}")


def clopper_pearson(k: int, n: int, confidence: float = 0.95, side: Side = "upper") -> Bound:
    """Exact one-sided Clopper–Pearson bound on a binomial rate from ``k`` successes in ``n`` trials.

    Upper: ``Beta.ppf(c; k+1, n-k)`` (1 if ``k=n``); lower: ``Beta.ppf(1-c; k, n-k+1)`` (0 if ``k=0``).
    ``n = 0`` gives the vacuous bound (1 for upper, 0 for lower) and a NaN estimate.
    """
    confidence = _check_confidence(confidence)
    _check_side(side)
    k_i, n_i = int(k), int(n)
    if k_i != k or n_i != n or n_i < 0 or not (0 <= k_i <= n_i):
        raise ValueError(f"clopper_pearson needs integers 0 <= k <= n, got k={k!r}, n={n!r}")
    alpha = 1.0 - confidence
    if n_i == 0:
        return Bound(float("nan"), 1.0 if side == "upper" else 0.0, side, confidence, CLOPPER_PEARSON, 0, 0.0)
    if side == "upper":
        value = 1.0 if k_i == n_i else float(stats.beta.ppf(1.0 - alpha, k_i + 1, n_i - k_i))
    else:
        value = 0.0 if k_i == 0 else float(stats.beta.ppf(alpha, k_i, n_i - k_i + 1))
    return Bound(k_i / n_i, value, side, confidence, CLOPPER_PEARSON, n_i, float(k_i))


def empirical_bernstein(values: np.ndarray, confidence: float = 0.95, side: Side = "upper") -> Bound:
    """Maurer–Pontil empirical-Bernstein one-sided bound on the mean of i.i.d. values in ``[0, 1]``.

    ``mean ± (sqrt(2 V ln(2/α) / n) + 7 ln(2/α) / (3 (n-1)))`` clipped to ``[0, 1]``, ``V`` the unbiased variance.
    Fewer than two values give the vacuous bound.
    """
    confidence = _check_confidence(confidence)
    _check_side(side)
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite (found NaN or inf)")
    if x.size and (x.min() < -1e-12 or x.max() > 1.0 + 1e-12):
        raise ValueError(f"values must lie in [0, 1] for the empirical-Bernstein bound, got range [{x.min()}, {x.max()}]")
    n = int(x.size)
    vacuous = 1.0 if side == "upper" else 0.0
    if n < 2:
        est = float(x.mean()) if n else float("nan")
        return Bound(est, vacuous, side, confidence, EMPIRICAL_BERNSTEIN, n, float(x.sum()))
    mean = float(x.mean())
    var = float(x.var(ddof=1))
    log_term = math.log(2.0 / (1.0 - confidence))
    width = math.sqrt(2.0 * var * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))
    value = min(1.0, mean + width) if side == "upper" else max(0.0, mean - width)
    return Bound(mean, value, side, confidence, EMPIRICAL_BERNSTEIN, n, float(x.sum()))


def bootstrap(values: np.ndarray, confidence: float = 0.95, side: Side = "upper", *, resamples: int = 2000,
              seed: int = 0) -> Bound:
    """Percentile-bootstrap one-sided bound on the mean: the ``c`` (upper) or ``1-c`` (lower) quantile of resampled
    means. Approximate (no finite-sample guarantee); used only for values that are not confined to ``[0, 1]``."""
    confidence = _check_confidence(confidence)
    _check_side(side)
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite (found NaN or inf)")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    n = int(x.size)
    if n < 2:
        est = float(x.mean()) if n else float("nan")
        return Bound(est, math.inf if side == "upper" else -math.inf, side, confidence, BOOTSTRAP, n, float(x.sum()))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // n))
    means = np.concatenate([x[rng.integers(0, n, size=(min(chunk, resamples - i), n))].mean(1)
                            for i in range(0, resamples, chunk)])
    q = confidence if side == "upper" else 1.0 - confidence
    return Bound(float(x.mean()), float(np.quantile(means, q)), side, confidence, BOOTSTRAP, n, float(x.sum()))


def bound_in_safe_direction(
    direction: Literal["<=", ">="],
    confidence: float,
    *,
    count: int | None = None,
    n: int | None = None,
    values: np.ndarray | None = None,
) -> Bound:
    """The bound a pass/fail decision needs: upper for ``≤`` constraints, lower for ``≥``.

    Give ``count`` and ``n`` for a rate (Clopper–Pearson) or ``values`` in [0, 1] (empirical Bernstein).
    """
    if direction not in ("<=", ">="):
        raise ValueError(f"direction must be '<=' or '>=', got {direction!r}")
    side: Side = "upper" if direction == "<=" else "lower"
    if values is not None:
        if count is not None or n is not None:
            raise ValueError("give either values or (count, n), not both")
        return empirical_bernstein(values, confidence, side)
    if count is None or n is None:
        raise ValueError("give values, or both count and n")
    return clopper_pearson(count, n, confidence, side)
