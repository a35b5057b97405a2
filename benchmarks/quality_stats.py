"""The statistics of the quality benchmark: t-intervals over seeds, the validation selection rule, and dominance.

Kept free of torch and of the scenarios so that ``tests/test_quality_protocol.py`` checks them in milliseconds.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats


@dataclass(frozen=True)
class Interval:
    """Mean and the half-width of its two-sided t-interval (``half`` is ``nan`` for one value)."""

    mean: float
    half: float

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean ± t_{(1+level)/2, n−1} · s/√n over ``values`` (seeds); approximate: it assumes normal seed-to-seed
    variation, which 5 seeds cannot check."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n))


def select_setting(val: Sequence[Mapping[str, float]], threshold: float, lower_is_better: bool) -> int:
    """Index of the chosen setting from validation results ``[{"task", "unsafe"}, ...]`` (the same rule for every
    method): the best task metric among settings whose unsafe estimate is within ``threshold``; when none is, the
    lowest unsafe estimate (ties: the better task metric). Earlier settings win exact ties."""
    if not val:
        raise ValueError("select_setting needs at least one setting")
    sign = -1.0 if lower_is_better else 1.0
    feasible = [i for i, r in enumerate(val) if r["unsafe"] <= threshold]
    if feasible:
        return max(feasible, key=lambda i: (sign * val[i]["task"], -i))
    return min(range(len(val)), key=lambda i: (val[i]["unsafe"], -sign * val[i]["task"], i))


def dominates(a: Mapping[str, Sequence[float]], c: Mapping[str, Sequence[float]], lower_is_better: bool,
              level: float = 0.95) -> bool:
    """Whether method ``a`` dominates method ``c`` beyond the intervals: over the same seeds (paired), the t-interval
    of the per-seed difference lies strictly on ``a``'s better side for the task metric *and* for the unsafe rate.
    ``a`` and ``c`` map ``"task"`` and ``"unsafe"`` to per-seed values in the same seed order."""
    if len(a["task"]) != len(c["task"]) or len(a["unsafe"]) != len(c["unsafe"]) or len(a["task"]) < 2:
        raise ValueError("dominance needs the same seeds (at least two) for both methods")
    sign = -1.0 if lower_is_better else 1.0
    task_gain = t_interval([sign * (x - y) for x, y in zip(a["task"], c["task"])], level)
    safety_gain = t_interval([y - x for x, y in zip(a["unsafe"], c["unsafe"])], level)
    return task_gain.lo > 0 and safety_gain.lo > 0


def dominated_by(per_method: Mapping[str, Mapping[str, Sequence[float]]], target: str, lower_is_better: bool,
                 level: float = 0.95) -> list[str]:
    """The methods of ``per_method`` that dominate ``target`` (see :func:`dominates`)."""
    c = per_method[target]
    return [m for m, v in per_method.items() if m != target and dominates(v, c, lower_is_better, level)]


def interval_row(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """``{"mean", "ci95"}`` (the half-width; ``None`` for a single seed) for the JSON rows."""
    iv = t_interval(values, level)
    return {"mean": iv.mean, "ci95": None if math.isnan(iv.half) else iv.half}
