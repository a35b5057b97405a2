"""Anytime-valid monitoring of student constraints on a held-out stream during training.

For each constraint with a declared support, a betting **confidence sequence** (Waudby-Smith & Ramdas 2024) on
``R = E[V]/E[C]`` over held-out units: for every ``r`` on a grid, the capitals
``K⁺_t(r) = Π (1 + λ_i (r w_i − x_i))`` (tests ``R ≥ r``) and ``K⁻_t(r) = Π (1 + λ_i (x_i − r w_i))`` (tests
``R ≤ r``), with items rescaled to [0, 1] by the support, units scaled by the declared ``max_unit_count`` and
predictable bets ``λ_i = min(c, sqrt(2 log(1/α) / (σ̂²_{i−1} i log(1+i))))``. By Ville's inequality a capital
under its null reaches ``1/α`` at *any* time with probability ≤ α, so the bounds hold simultaneously over every
look: the monitor may be checked after every batch. A rejected ``r`` stays rejected (running intersection).

A constraint is **certified** as soon as its bound in the safe direction meets the threshold, and flagged
**cannot be met** as soon as its bound in the other direction is past the threshold (each claim wrong with
probability ≤ α). Every held-out unit must be fresh: a unit fed twice breaks the guarantee.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from safekd.auditing.bounds import betting_lambdas, check_level
from safekd.auditing.measure import check_support, per_example_sums, support_interval
from safekd.spec.constraints import StudentConstraint
from safekd.spec.document import Spec
from safekd.targets.teachers import logits_of

__all__ = ["ConfidenceSequence", "ConstraintMonitor", "MonitorStatus", "CERTIFIED", "CANNOT_BE_MET", "UNDECIDED"]

CERTIFIED, CANNOT_BE_MET, UNDECIDED = "certified", "cannot be met", "undecided"


def _grid(points: int) -> np.ndarray:
    """Points in [0, 1], dense near both ends (small rates and high accuracies)."""
    tail = np.geomspace(1e-7, 1.0, points // 3)
    return np.unique(np.concatenate([[0.0, 1.0], np.linspace(0.0, 1.0, points // 3), tail, 1.0 - tail]))


class ConfidenceSequence:
    """Anytime-valid two-sided bounds on a ratio ``Σx/Σw`` of [0, 1]-scaled units (``0 ≤ x ≤ w ≤ 1``), fed in batches.

    ``update(x, w)`` adds units; ``upper`` / ``lower`` are the current bounds (each at level ``1 − α``), valid
    simultaneously over every update.
    """

    def __init__(self, alpha: float, grid_points: int = 3000) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if grid_points < 16:
            raise ValueError(f"grid_points must be >= 16, got {grid_points}")
        self.alpha = float(alpha)
        self.grid = _grid(grid_points)
        self.log_up = np.zeros_like(self.grid)   # log K⁺(r): large ⇒ R < r
        self.log_low = np.zeros_like(self.grid)  # log K⁻(r): large ⇒ R > r
        self.rejected_up = np.zeros(self.grid.shape, dtype=bool)
        self.rejected_low = np.zeros(self.grid.shape, dtype=bool)
        self.n, self.sum_x, self.sum_w, self.sum_sq = 0, 0.0, 0.0, 0.0

    def update(self, x: np.ndarray, w: np.ndarray) -> None:
        x, w = np.asarray(x, np.float64).reshape(-1), np.asarray(w, np.float64).reshape(-1)
        keep = w > 0
        x, w = x[keep], w[keep]
        if not x.size:
            return
        lam, sq = betting_lambdas(x, w, self.alpha, anytime=True,
                                  start=(self.n, self.sum_x, self.sum_w, self.sum_sq))
        d = self.grid[:, None] * w[None, :] - x[None, :]  # [G, B]
        self.log_up += np.log1p(lam * d).sum(1)
        self.log_low += np.log1p(-lam * d).sum(1)
        target = math.log(1.0 / self.alpha)
        self.rejected_up |= self.log_up >= target
        self.rejected_low |= self.log_low >= target
        self.n += int(x.size)
        self.sum_x += float(x.sum())
        self.sum_w += float(w.sum())
        self.sum_sq = float(sq)

    @property
    def upper(self) -> float:
        """Smallest rejected grid point (the rejected set is an up-set: K⁺ increases in r); 1 if none."""
        hit = np.flatnonzero(self.rejected_up)
        return float(self.grid[hit[0]]) if hit.size else 1.0

    @property
    def lower(self) -> float:
        hit = np.flatnonzero(self.rejected_low)
        return float(self.grid[hit[-1]]) if hit.size else 0.0


@dataclass(frozen=True)
class MonitorStatus:
    """One constraint's confidence sequence now: ``lower ≤ R ≤ upper`` over ``n`` units, and the decision."""

    name: str
    direction: str
    threshold: float
    estimate: float
    lower: float
    upper: float
    n: int
    status: str


class ConstraintMonitor:
    """Anytime-valid monitor of a spec's student constraints on a held-out stream (one row = one unit).

        >>> mon = ConstraintMonitor(spec, confidence=0.95)
        >>> for step, batch in enumerate(train):
        ...     distiller.step(batch)
        ...     if step % 200 == 0:
        ...         mon.observe(student, next(heldout), distiller=distiller)   # fresh held-out rows each time
        ...         if mon.all_certified or mon.failing: break

    Args:
        spec: a :class:`~safekd.spec.Spec` (its student constraints) or a sequence of student constraints.
        confidence: one-sided level of every bound, valid over all looks.
        max_unit_count: the most counted items one unit (row) can hold (1 for one prediction per row; the
            sequence length for token data); declared up front because the bets must be predictable.
        grid_points: resolution of the grid of tested rates (validity does not depend on it).
    """

    def __init__(self, spec: Spec | Sequence[StudentConstraint], confidence: float = 0.95, *,
                 max_unit_count: float = 1.0, grid_points: int = 3000) -> None:
        check_level(confidence)
        if not (isinstance(max_unit_count, (int, float)) and math.isfinite(max_unit_count) and max_unit_count > 0):
            raise ValueError(f"max_unit_count must be a positive number, got {max_unit_count!r}")
        self.spec = spec if isinstance(spec, Spec) else None
        cons = list(spec.student_constraints if isinstance(spec, Spec) else spec)
        unsupported = [c.name for c in cons if c.value_support is None]
        if unsupported:
            raise ValueError(f"constraints {unsupported} declare no support, so no confidence sequence is valid for "
                             "them; declare `support=(lo, hi)` (or monitor the others)")
        if not cons:
            raise ValueError("nothing to monitor: no student constraints")
        self.constraints = cons
        self.confidence = float(confidence)
        self.max_unit_count = float(max_unit_count)
        self.sequences = {c.name: ConfidenceSequence(1.0 - self.confidence, grid_points) for c in cons}
        self._sums = {c.name: [0.0, 0.0] for c in cons}

    def update(self, name: str, values: np.ndarray | Tensor, counts: np.ndarray | Tensor) -> None:
        """Add held-out units of constraint ``name``: per-unit value sums and counts (as the training code measures)."""
        c = next((c for c in self.constraints if c.name == name), None)
        if c is None:
            raise KeyError(f"no monitored constraint named {name!r}; have {[c.name for c in self.constraints]}")
        v = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, np.float64).reshape(-1)
        n = np.asarray(counts.detach().cpu() if isinstance(counts, Tensor) else counts, np.float64).reshape(-1)
        if v.shape != n.shape or not (np.all(np.isfinite(v)) and np.all(np.isfinite(n))):
            raise ValueError(f"constraint {name!r}: values and counts must be finite and of one shape")
        if n.size and n.max() > self.max_unit_count:
            raise ValueError(f"constraint {name!r}: a unit counts {n.max():g} items > max_unit_count "
                             f"{self.max_unit_count:g}; declare the largest unit up front")
        support = c.value_support
        check_support(c.name, support, v, n)
        lo, hi = support_interval(support)
        x = np.clip((v - lo * n) / (hi - lo), 0.0, n)
        self.sequences[name].update(x / self.max_unit_count, n / self.max_unit_count)
        self._sums[name][0] += float(v.sum())
        self._sums[name][1] += float(n.sum())

    def observe(self, student: nn.Module, batch: Mapping[str, Any], *, distiller: Any | None = None) -> None:
        """Measure every monitored constraint on a fresh held-out ``batch`` (rows = units) and add it."""
        if "group_ids" in batch:
            raise ValueError("ConstraintMonitor.observe takes each row as one unit; a batch with 'group_ids' must be "
                             "reduced to whole groups first (use update() with per-group sums and counts)")
        was = student.training
        student.eval()
        try:
            with torch.no_grad():
                logits = logits_of(student(batch["inputs"]), "the student")
                out = distiller.targets(batch, logits, expand=False) if distiller is not None else None
        finally:
            student.train(was)
        names = self.spec.teacher_names if self.spec is not None else None
        unsafe = self.spec.unsafe if self.spec is not None else None
        for c in self.constraints:
            v, n = per_example_sums(c, logits, batch, teacher_logprobs=None if out is None else out.teacher_logp,
                                    teacher_names=names, unsafe=unsafe,
                                    target_logp=None if out is None else out.target_logp)
            self.update(c.name, v, n)

    def status(self) -> dict[str, MonitorStatus]:
        """Each constraint's current bounds (original units) and decision."""
        out = {}
        for c in self.constraints:
            cs = self.sequences[c.name]
            lo, hi = support_interval(c.value_support)
            lower, upper = lo + (hi - lo) * cs.lower, lo + (hi - lo) * cs.upper
            safe, unsafe = (upper, lower) if c.sense == "<=" else (lower, upper)
            ok = safe <= c.threshold if c.sense == "<=" else safe >= c.threshold
            bad = unsafe > c.threshold if c.sense == "<=" else unsafe < c.threshold
            s, k = self._sums[c.name]
            out[c.name] = MonitorStatus(c.name, c.sense, c.threshold, s / k if k else math.nan, lower, upper, cs.n,
                                        CERTIFIED if ok else CANNOT_BE_MET if bad else UNDECIDED)
        return out

    @property
    def all_certified(self) -> bool:
        """Every monitored constraint certified: training may stop with a PASS that holds despite the looks."""
        return all(s.status == CERTIFIED for s in self.status().values())

    @property
    def failing(self) -> list[str]:
        """Constraints whose confidence sequence is already entirely on the wrong side of the threshold."""
        return [s.name for s in self.status().values() if s.status == CANNOT_BE_MET]
