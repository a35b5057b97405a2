"""One-sided confidence bounds used by the audit, each valid at finite ``n`` for its declared support.

- **Clopper–Pearson** (exact, for 0/1 outcomes, ``k`` of ``n``): upper ``U = Beta.ppf(1-α; k+1, n-k)`` (``U = 1`` at
  ``k = n``), lower ``L = Beta.ppf(α; k, n-k+1)`` (``L = 0`` at ``k = 0``).
- **Betting (hedged capital)** (Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting",
  JRSS-B 2024) for a mean of values in ``[0, 1]`` and, more generally, a ratio of sums ``R = E[V]/E[C]`` over
  independent units with ``0 ≤ V ≤ C ≤ s``. ``R ≤ r`` is rejected when the capital
  ``K_n(r) = Π_i (1 + λ_i (r C_i − V_i)/s)`` reaches ``1/α``; with predictable ``λ_i ∈ [0, c]``, ``c < 1``, it is a
  non-negative supermartingale under ``R ≥ r`` (Ville's inequality), and ``K_n`` increases in ``r``, so
  ``U = inf{r : K_n(r) ≥ 1/α}`` is found by bisection. The bets ``λ_i = min(c, sqrt(2 log(1/α) / (n σ̂²_{i−1})))``
  (fixed ``n``) or ``sqrt(2 log(1/α) / (σ̂²_{i−1} i log(1+i)))`` (anytime: a confidence *sequence*) use a running
  variance of the residuals; the units are taken in a seeded random order, recorded with the bound.
- **Maurer–Pontil empirical Bernstein** (valid, wider; kept for comparison): ``X̄ + sqrt(2 V ln(2/α)/n) +
  7 ln(2/α)/(3(n−1))``.
- **Percentile bootstrap** — an *estimate* of uncertainty for values without a declared support (a KL); it is
  reported, never used to certify.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats

__all__ = [
    "Bound", "CLOPPER_PEARSON", "BETTING", "EMPIRICAL_BERNSTEIN", "BOOTSTRAP",
    "check_level", "clopper_pearson", "betting", "betting_log_capital", "betting_lambdas", "empirical_bernstein", "bootstrap",
]

CLOPPER_PEARSON = "clopper-pearson"
BETTING = "betting (Waudby-Smith & Ramdas 2024)"
EMPIRICAL_BERNSTEIN = "empirical-bernstein (Maurer-Pontil 2009)"
BOOTSTRAP = "percentile-bootstrap (estimate, not a certificate)"
BET_CAP = 0.75  # c: every factor 1 + λ d with |d| ≤ 1 stays ≥ 1 − c > 0

Side = Literal["upper", "lower"]


@dataclass(frozen=True)
class Bound:
    """A one-sided confidence bound: with probability ≥ ``confidence`` the true quantity is ≤ ``value``
    (``side="upper"``) or ≥ ``value`` (``side="lower"``). ``seed``/``resamples`` record what a randomised method
    used; ``certifies`` is False for estimates (bootstrap) that may be shown but never gate a PASS."""

    estimate: float
    value: float
    side: Side
    confidence: float
    method: str
    n: int
    count: float | None = None
    seed: int | None = None
    resamples: int | None = None
    certifies: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def check_level(value: float, name: str = "confidence") -> float:
    """``value`` as a float in (0, 1), or ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def _check_side(side: str) -> None:
    if side not in ("upper", "lower"):
        raise ValueError(f"side must be 'upper' or 'lower', got {side!r}")


def clopper_pearson(k: int, n: int, confidence: float = 0.95, side: Side = "upper") -> Bound:
    """Exact one-sided Clopper–Pearson bound on a binomial rate from ``k`` successes in ``n`` trials.

    ``n = 0`` gives the vacuous bound (1 for upper, 0 for lower) and a NaN estimate.
    """
    confidence = check_level(confidence)
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


# ------------------------------------------------------------------------------------------------- betting
def betting_lambdas(x: np.ndarray, w: np.ndarray, alpha: float, *, anytime: bool = False,
                    start: tuple[int, float, float, float] = (0, 0.0, 0.0, 0.0), cap: float = BET_CAP
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Predictable bets ``λ_i`` (``[..., n]``) for scaled units ``x_i = V_i/s``, ``w_i = C_i/s`` (``0 ≤ x ≤ w ≤ 1``),
    and the running ``Σ (x_j − r̂_j w_j)²`` after the last unit (to continue a stream).

    ``σ̂²_i = (¼ + Σ_{j≤i} (x_j − r̂_j w_j)²)/(i + 1)`` with ``r̂_j = (½ + Σ_{k≤j} x_k)/(1 + Σ_{k≤j} w_k)``; ``λ_i`` reads
    ``σ̂²_{i−1}`` only. ``start = (units, Σx, Σw, Σ squares)`` already seen (a stream); fixed-``n`` bets
    (``anytime=False``) use the horizon ``n``, anytime bets ``i log(1 + i)``.
    """
    n0, sx, sw, sq0 = start
    n = x.shape[-1]
    r_hat = (0.5 + sx + np.cumsum(x, -1)) / (1.0 + sw + np.cumsum(w, -1))
    i = n0 + np.arange(1, n + 1, dtype=np.float64)
    sq = sq0 + np.cumsum((x - r_hat * w) ** 2, -1)
    var = (0.25 + sq) / (i + 1.0)
    first = np.full(x.shape[:-1] + (1,), (0.25 + sq0) / (n0 + 1.0))
    prev = np.concatenate([first, var[..., :-1]], -1)  # σ̂²_{i−1}: predictable
    log_inv = math.log(1.0 / alpha)
    lam = np.sqrt(2.0 * log_inv / (prev * (i * np.log1p(i) if anytime else float(n0 + n))))
    return np.minimum(lam, cap), sq[..., -1]


def betting_log_capital(r: np.ndarray | float, x: np.ndarray, w: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """``log K_n(r) = Σ_i log(1 + λ_i (r w_i − x_i))`` over the last axis (``r`` broadcasts against ``[...]``)."""
    r = np.asarray(r, dtype=np.float64)[..., None]
    return np.log1p(lam * (r * w - x)).sum(-1)


def _betting_upper(x: np.ndarray, w: np.ndarray, alpha: float, lam: np.ndarray, iters: int = 48) -> np.ndarray:
    """``inf{r ∈ [0, 1] : log K_n(r) ≥ log(1/α)}`` by bisection (``K_n`` increases in ``r``); 1 if never reached.
    The returned end is the rejected one, so the bound errs upward."""
    target = math.log(1.0 / alpha)
    lo = np.zeros(x.shape[:-1])
    hi = np.ones(x.shape[:-1])
    never = betting_log_capital(hi, x, w, lam) < target
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        up = betting_log_capital(mid, x, w, lam) >= target
        hi = np.where(up, mid, hi)
        lo = np.where(up, lo, mid)
    return np.where(never, 1.0, hi)


def betting_ratio_upper(v: np.ndarray, c: np.ndarray, alpha: float, *, scale: float | None = None) -> np.ndarray:
    """Upper bounds (``[...]``) on ``R = E[V]/E[C]`` from units ``v, c`` ``[..., n]`` with ``0 ≤ v ≤ c``, taken in
    the given order (shuffle first). Units are scaled by ``scale`` (the largest possible unit count, declared), or
    else by ``max c`` over the last axis."""
    s = np.maximum(c.max(-1, keepdims=True), 1e-300) if scale is None else float(scale)
    x, w = v / s, c / s
    lam, _ = betting_lambdas(x, w, alpha)
    return _betting_upper(x, w, alpha, lam)


def betting(values: np.ndarray, counts: np.ndarray | None = None, confidence: float = 0.95, side: Side = "upper",
            *, seed: int = 0, scale: float | None = None) -> Bound:
    """Betting bound on the mean of ``values`` in ``[0, 1]`` or, with ``counts``, on the ratio ``Σ v / Σ c`` of
    units with ``0 ≤ v ≤ c``. Units are taken in a permutation drawn from ``seed`` (recorded in the bound) and
    scaled by ``scale`` (the largest possible count of a unit; default: the largest observed)."""
    confidence = check_level(confidence)
    _check_side(side)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.ones_like(v) if counts is None else np.asarray(counts, dtype=np.float64).reshape(-1)
    if v.shape != c.shape:
        raise ValueError(f"values ({v.size}) and counts ({c.size}) must have one entry per unit")
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(c))):
        raise ValueError("values and counts must be finite (found NaN or inf)")
    tol = 1e-9 * np.maximum(c, 1.0)
    if np.any(c < 0) or np.any(v < -tol) or np.any(v > c + tol):
        raise ValueError("betting needs 0 <= value <= count for every unit (values in [0, 1] per counted item)")
    if scale is not None and not (math.isfinite(scale) and scale > 0 and (not c.size or scale >= c.max())):
        raise ValueError(f"scale {scale!r} must be finite and at least the largest unit count "
                         f"{c.max() if c.size else 0:g}")
    keep = c > 0
    v, c = np.clip(v[keep], 0.0, c[keep]), c[keep]
    n = int(v.size)
    est = float(v.sum() / c.sum()) if n else float("nan")
    if n == 0:
        return Bound(est, 1.0 if side == "upper" else 0.0, side, confidence, BETTING, 0, 0.0, seed=seed)
    order = np.random.default_rng(seed).permutation(n)
    v, c = v[order], c[order]
    alpha = 1.0 - confidence
    if side == "upper":
        value = float(betting_ratio_upper(v, c, alpha, scale=scale))
    else:  # a lower bound on R is one minus an upper bound on the complementary ratio Σ(c − v)/Σ c
        value = 1.0 - float(betting_ratio_upper(c - v, c, alpha, scale=scale))
    return Bound(est, value, side, confidence, BETTING, n, float(v.sum()), seed=seed)


# ----------------------------------------------------------------------------------------- for comparison
def empirical_bernstein(values: np.ndarray, confidence: float = 0.95, side: Side = "upper") -> Bound:
    """Maurer–Pontil empirical-Bernstein one-sided bound on the mean of i.i.d. values in ``[0, 1]``.

    ``mean ± (sqrt(2 V ln(2/α) / n) + 7 ln(2/α) / (3 (n-1)))`` clipped to ``[0, 1]``, ``V`` the unbiased variance.
    Fewer than two values give the vacuous bound.
    """
    confidence = check_level(confidence)
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


def bootstrap(values: np.ndarray, counts: np.ndarray | None = None, confidence: float = 0.95, side: Side = "upper",
              *, resamples: int = 2000, seed: int = 0) -> Bound:
    """Percentile-bootstrap bound on ``Σ v / Σ c`` over units (the mean when ``counts`` is None): the ``c`` (upper)
    or ``1-c`` (lower) quantile of ``resamples`` seeded resampled ratios. An estimate with no finite-sample
    guarantee (``certifies=False``): shown for values without a declared support, never used to pass."""
    confidence = check_level(confidence)
    _check_side(side)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.ones_like(v) if counts is None else np.asarray(counts, dtype=np.float64).reshape(-1)
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(c))):
        raise ValueError("values must be finite (found NaN or inf)")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    keep = c > 0
    v, c = v[keep], c[keep]
    n = int(v.size)
    est = float(v.sum() / c.sum()) if n else float("nan")
    if n < 2:
        return Bound(est, math.inf if side == "upper" else -math.inf, side, confidence, BOOTSTRAP, n, float(v.sum()),
                     seed=seed, resamples=resamples, certifies=False)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // n))
    ratios = []
    for i in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - i), n))
        ratios.append(v[idx].sum(1) / c[idx].sum(1))
    q = confidence if side == "upper" else 1.0 - confidence
    return Bound(est, float(np.quantile(np.concatenate(ratios), q)), side, confidence, BOOTSTRAP, n, float(v.sum()),
                 seed=seed, resamples=resamples, certifies=False)
