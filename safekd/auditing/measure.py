"""Per-example constraint measurements and the bound each one gets.

The audit measures a student constraint with the constraint's own ``measure_batch`` (the code training uses),
applied to each example of a batch as a batch of one through ``torch.func.vmap`` (no Python loop over
examples). An *example* (row 0 of the batch: a sample, or a whole sequence for token data) is the unit of the
confidence bound, because tokens of one sequence are not independent.

Bound choice from the per-example ``(value_sum_i, count_i)`` of the units with ``count_i > 0`` and the
value's declared ``support`` (``"unit"``: known to lie in [0, 1]; ``"unbounded"``: e.g. a KL; ``"unknown"``: a
user metric, judged from the observed values):

- every ``count_i = 1`` and ``value_i ∈ {0, 1}`` → a count-based rate ``Σ v / n`` → exact Clopper–Pearson;
- per-example rates ``r_i = v_i / c_i`` in [0, 1] (support ``unit``, or ``unknown`` and observed in [0, 1]) →
  Maurer–Pontil empirical Bernstein on ``mean(r)``;
- otherwise (support ``unbounded``, or values outside [0, 1]) → percentile bootstrap on ``mean(r)`` (approximate).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from safekd.auditing.bounds import Bound, bootstrap, clopper_pearson, empirical_bernstein
from safekd.constraints import StudentConstraint
from safekd.unsafe import UnsafeSet

__all__ = ["per_example_sums", "bound_for_units", "signed_slack"]

logger = logging.getLogger(__name__)


def per_example_sums(constraint: StudentConstraint, student_logits: Tensor, batch: Mapping[str, Any], *,
                     teacher_logprobs: Tensor | None = None, teacher_names: Sequence[str] | None = None,
                     unsafe: UnsafeSet | None = None, target_logp: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(value_sum [B], count [B])``: ``constraint.measure_batch`` on each example ``b`` as a batch of one.

    Batch entries whose leading size is ``B`` are split along it; other entries are passed whole.
    """
    B = student_logits.shape[0]
    keys = [k for k, v in batch.items() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B]
    split = {k: batch[k] for k in keys}
    shared = {k: v for k, v in batch.items() if k not in split}
    extra = {"teacher_logprobs": teacher_logprobs, "target_logp": target_logp}
    ex_split = {k: v for k, v in extra.items() if v is not None}

    def one(logits: Tensor, part: dict[str, Tensor], ex: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        b = {**shared, **{k: v.unsqueeze(0) for k, v in part.items()}}
        kw = {k: v.unsqueeze(0) for k, v in ex.items()}
        ms = constraint.measure_batch(logits.unsqueeze(0), b, teacher_names=teacher_names, unsafe=unsafe, **kw)
        return ms.value_sum.detach(), ms.count.detach()

    with torch.no_grad():
        try:
            values, counts = torch.func.vmap(one)(student_logits, split, ex_split)
        except RuntimeError as exc:  # a user metric that vmap cannot trace (e.g. calls .item())
            logger.warning("constraint %r cannot be vmapped (%s); measuring examples one at a time",
                           constraint.name, exc)
            pairs = [one(student_logits[i], {k: v[i] for k, v in split.items()},
                         {k: v[i] for k, v in ex_split.items()}) for i in range(B)]
            values = torch.stack([p[0] for p in pairs])
            counts = torch.stack([p[1] for p in pairs])
    return values.reshape(B), counts.reshape(B)


def signed_slack(direction: str, bound: float, threshold: float, tolerance: float = 0.0) -> float:
    """Slack in the safe direction, tolerance included: ``thr + tol − bound`` (``≤``) or ``bound − thr + tol`` (``≥``)."""
    if not math.isfinite(bound):
        return float("-inf")
    return threshold + tolerance - bound if direction == "<=" else bound - threshold + tolerance


def bound_for_units(values: np.ndarray, counts: np.ndarray, direction: str, confidence: float,
                    support: str = "unknown") -> Bound:
    """The one-sided bound (upper for ``≤``, lower for ``≥``) from per-example sums; see the module docstring."""
    if support not in ("unit", "unbounded", "unknown"):
        raise ValueError(f"support must be 'unit', 'unbounded' or 'unknown', got {support!r}")
    side = "upper" if direction == "<=" else "lower"
    v = np.asarray(values, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if v.shape != c.shape:
        raise ValueError(f"values shape {v.shape} != counts shape {c.shape}")
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(c))):
        raise ValueError("per-example measurements contain NaN or inf; check the student's outputs and the data")
    units = c > 0
    v, c = v[units], c[units]
    if support != "unbounded" and np.all(c == 1) and np.all((v == 0) | (v == 1)):
        return clopper_pearson(int(v.sum()), int(v.size), confidence, side)  # type: ignore[arg-type]
    r = v / c if v.size else v
    if support != "unbounded" and np.all((r >= -1e-12) & (r <= 1 + 1e-12)):
        return empirical_bernstein(np.clip(r, 0.0, 1.0), confidence, side)  # type: ignore[arg-type]
    return bootstrap(r, confidence, side)  # type: ignore[arg-type]
