"""Theorem harnesses: each result of the framework as a small float64 toy that measures the quantity,
compares it with its bound or prediction, and returns a `TheoryResult` (pass/fail, details, plot).

    >>> from safekd.theory import run
    >>> run("convergence-nonconvex", plot=False).passed
    True
"""
from safekd.theory.registry import HARNESSES, run
from safekd.theory.result import TheoryResult

__all__ = ["HARNESSES", "TheoryResult", "run"]
