"""Per-unit constraint measurements and the bound each one gets.

The audit measures a student constraint with the constraint's own ``measure_batch`` (the code training uses) on
each **unit** — an example (row 0 of the batch: a sample, or a whole sequence), or the group a ``group_ids``
batch key names (``[B]`` per example or per token) — as sums ``V_u`` and counts ``C_u`` of the counted items. The
estimand is the one training measures, the ratio of sums ``R = E[V]/E[C]`` (a token rate for token data; the
plain mean when every unit counts one item).

Bound choice, from the constraint's *declared* support of one counted item (never from the observed values):

- ``"binary"`` and every counted unit holds one item → ``k = Σ V`` of ``n`` units → exact Clopper–Pearson;
- ``"binary"`` or ``(lo, hi)`` otherwise → the betting bound on the ratio (items rescaled to [0, 1] by the
  support), valid at finite ``n`` for any unit sizes and any dependence inside a unit;
- no support (a KL, an undeclared user metric) → **not certified**: a percentile bootstrap is shown as an
  estimate (resamples and seed recorded) and the constraint cannot pass.

Measurements outside the declared support raise an error naming the constraint.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from safekd.auditing.bounds import Bound, betting, bootstrap, clopper_pearson
from safekd.common.batches import default_mask
from safekd.spec.constraints import StudentConstraint, Support
from safekd.spec.unsafe import UnsafeSet

__all__ = ["per_example_sums", "per_group_sums", "bound_for_units", "check_support",
           "support_interval", "support_label",
           "signed_slack"]

logger = logging.getLogger(__name__)


def _measure(constraint: StudentConstraint, logits: Tensor, batch: Mapping[str, Any], kw: dict[str, Any]
             ) -> tuple[Tensor, Tensor]:
    ms = constraint.measure_batch(logits, batch, **kw)
    return ms.value_sum.detach(), ms.count.detach()


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
    kw0 = {"teacher_names": teacher_names, "unsafe": unsafe}

    def one(logits: Tensor, part: dict[str, Tensor], ex: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        b = {**shared, **{k: v.unsqueeze(0) for k, v in part.items()}}
        return _measure(constraint, logits.unsqueeze(0), b, {**kw0, **{k: v.unsqueeze(0) for k, v in ex.items()}})

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


def per_group_sums(constraint: StudentConstraint, student_logits: Tensor, batch: Mapping[str, Any],
                   group_ids: Tensor, **kw: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(groups [G], value_sum [G], count [G])`` for per-token ``group_ids`` (the token shape): the constraint
    measured on the whole batch with its mask restricted to each group in turn (``vmap`` over the G masks)."""
    groups, inv = torch.unique(group_ids, return_inverse=True)
    base = batch.get("mask")
    base = default_mask(batch, group_ids.shape, group_ids.device) if base is None else base
    masks = (inv.unsqueeze(0) == torch.arange(groups.numel(), device=inv.device).view(-1, *[1] * inv.dim())) & base

    def one(m: Tensor) -> tuple[Tensor, Tensor]:
        return _measure(constraint, student_logits, {**batch, "mask": m}, kw)

    with torch.no_grad():
        try:
            values, counts = torch.func.vmap(one)(masks)
        except RuntimeError as exc:
            logger.warning("constraint %r cannot be vmapped (%s); measuring groups one at a time", constraint.name, exc)
            pairs = [one(m) for m in masks]
            values, counts = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return groups, values.reshape(-1), counts.reshape(-1)


def support_interval(support: Support | None) -> tuple[float, float]:
    """The interval one counted item lies in: ``(0, 1)`` for ``"binary"``."""
    if support is None:
        raise ValueError("no declared support")
    return (0.0, 1.0) if support == "binary" else support


def support_label(support: Support | None) -> str:
    if support is None:
        return "undeclared (unbounded)"
    return "binary {0, 1}" if support == "binary" else f"[{support[0]:g}, {support[1]:g}]"


def check_support(name: str, support: Support | None, values: np.ndarray, counts: np.ndarray) -> None:
    """Raise ``ValueError`` (naming the constraint) when a unit's sum lies outside its declared support."""
    if support is None:
        return
    v, c = np.asarray(values, np.float64), np.asarray(counts, np.float64)
    lo, hi = support_interval(support)
    tol = 1e-9 * np.maximum(1.0, np.abs(c) * max(abs(lo), abs(hi), 1.0))
    bad = (v < lo * c - tol) | (v > hi * c + tol)
    if support == "binary":
        bad |= np.abs(v - np.round(v)) > tol
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"constraint {name!r}: a unit measured value sum {v[i]:g} over {c[i]:g} counted item(s), "
                         f"outside its declared support {support_label(support)}; fix the metric or its `support`")


def signed_slack(direction: str, bound: float, threshold: float) -> float:
    """Slack in the safe direction against the threshold alone: ``thr − bound`` (``≤``) or ``bound − thr`` (``≥``)."""
    if not math.isfinite(bound):
        return float("-inf")
    return threshold - bound if direction == "<=" else bound - threshold


def bound_for_units(values: np.ndarray, counts: np.ndarray, direction: str, confidence: float,
                    support: Support | None, *, seed: int = 0, resamples: int = 2000,
                    max_unit_count: float | None = None) -> Bound:
    """The one-sided bound (upper for ``≤``, lower for ``≥``) on ``Σ V / Σ C`` over units with ``C > 0``;
    see the module docstring. ``values`` must already satisfy ``support`` (:func:`check_support`)."""
    side = "upper" if direction == "<=" else "lower"
    v = np.asarray(values, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if v.shape != c.shape:
        raise ValueError(f"values shape {v.shape} != counts shape {c.shape}")
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(c))):
        raise ValueError("per-unit measurements contain NaN or inf; check the student's outputs and the data")
    units = c > 0
    v, c = v[units], c[units]
    if support is None:
        return bootstrap(v, c, confidence, side, resamples=resamples, seed=seed)  # type: ignore[arg-type]
    if support == "binary" and np.all(c == 1):
        return clopper_pearson(int(round(v.sum())), int(v.size), confidence, side)  # type: ignore[arg-type]
    lo, hi = support_interval(support)
    x = np.clip((v - lo * c) / (hi - lo), 0.0, c)  # items rescaled to [0, 1]: 0 ≤ x ≤ c
    b = betting(x, c, confidence, side, seed=seed, scale=max_unit_count)  # type: ignore[arg-type]
    scale = lambda r: lo + (hi - lo) * r  # noqa: E731
    return Bound(scale(b.estimate) if b.n else b.estimate, scale(b.value), b.side, b.confidence, b.method, b.n,
                 float(v.sum()), seed=b.seed)
