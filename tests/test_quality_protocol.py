"""The quality benchmark's statistics: t-intervals, the validation selection rule, dominance with intervals."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality_stats import dominated_by, dominates, interval_row, select_setting, t_interval  # noqa: E402


def test_t_interval_matches_the_textbook_value() -> None:
    iv = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert iv.mean == 3.0
    assert iv.half == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-5)  # t_{0.975,4} s/√n
    assert math.isnan(t_interval([0.7]).half) and interval_row([0.7]) == {"mean": 0.7, "ci95": None}
    with pytest.raises(ValueError):
        t_interval([])


def test_selection_prefers_the_best_feasible_task_metric() -> None:
    val = [{"task": 0.90, "unsafe": 0.05}, {"task": 0.80, "unsafe": 0.01}, {"task": 0.85, "unsafe": 0.02}]
    assert select_setting(val, threshold=0.04, lower_is_better=False) == 2   # 0.90 is infeasible
    assert select_setting(val, threshold=0.10, lower_is_better=False) == 0
    ppl = [{"task": 60.0, "unsafe": 0.0}, {"task": 55.0, "unsafe": 0.0}]
    assert select_setting(ppl, threshold=0.01, lower_is_better=True) == 1    # lower perplexity wins


def test_selection_falls_back_to_the_safest_setting() -> None:
    val = [{"task": 0.9, "unsafe": 0.30}, {"task": 0.5, "unsafe": 0.20}, {"task": 0.6, "unsafe": 0.20}]
    assert select_setting(val, threshold=0.1, lower_is_better=False) == 2    # safest, then better task
    with pytest.raises(ValueError):
        select_setting([], 0.1, False)


C = {"task": [0.80, 0.82, 0.81, 0.79, 0.80], "unsafe": [0.05, 0.06, 0.05, 0.04, 0.05]}


def test_consistently_better_on_both_axes_dominates() -> None:
    a = {"task": [t + 0.02 for t in C["task"]], "unsafe": [u - 0.02 for u in C["unsafe"]]}
    assert dominates(a, C, lower_is_better=False)
    assert not dominates(C, a, lower_is_better=False)


def test_better_means_within_the_interval_do_not_dominate() -> None:
    # better on average on both axes, but the task gain changes sign across seeds
    a = {"task": [0.85, 0.78, 0.86, 0.76, 0.82], "unsafe": [u - 0.02 for u in C["unsafe"]]}
    assert sum(a["task"]) > sum(C["task"])
    assert not dominates(a, C, lower_is_better=False)


def test_better_on_one_axis_only_does_not_dominate() -> None:
    a = {"task": [t + 0.05 for t in C["task"]], "unsafe": [u + 0.01 for u in C["unsafe"]]}
    assert not dominates(a, C, lower_is_better=False)


def test_lower_is_better_flips_the_task_axis() -> None:
    c = {"task": [60.0, 61.0, 59.0], "unsafe": [0.01, 0.02, 0.01]}
    a = {"task": [55.0, 56.5, 54.0], "unsafe": [0.005, 0.01, 0.004]}
    assert dominates(a, c, lower_is_better=True) and not dominates(a, c, lower_is_better=False)
    assert dominated_by({"a": a, "c": c}, "c", lower_is_better=True) == ["a"]
    assert dominated_by({"a": a, "c": c}, "a", lower_is_better=True) == []


def test_dominance_needs_paired_seeds() -> None:
    with pytest.raises(ValueError):
        dominates({"task": [1.0, 2.0], "unsafe": [0.0, 0.0]}, {"task": [1.0], "unsafe": [0.0]}, False)
