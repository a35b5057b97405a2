"""The inputs a weighting operator may read (`Signals`) and the error raised when one is missing.

Shapes (teacher axis before vocabulary, weights on the last axis):
``teacher_logits``/``teacher_logprobs`` ``[..., K, V]``, ``sampled_logprobs`` ``[..., K]``,
``labels``/``task_ids``/``mask`` ``[...]``, ``context`` ``[..., F]``, ``safety`` ``[K]`` or ``[..., K]``,
``student_logits`` ``[..., V]``.

`all_finite` and `no_nan_or_posinf` are the value scans used by every validating entry point of safekd (signals,
pools, divergences, the distiller): one fused reduction per tensor, exact.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from solvers.errors import holds

__all__ = ["Signals", "MissingSignalError", "SIGNAL_FIELDS", "TEACHER_FIELDS", "SCALE_FIELDS", "all_finite",
           "no_nan_or_posinf"]

SIGNAL_FIELDS: tuple[str, ...] = (
    "teacher_logits",
    "teacher_logprobs",
    "sampled_logprobs",
    "labels",
    "task_ids",
    "context",
    "safety",
    "student_logits",
    "mask",
)

#: Fields whose teacher axis is ``-2`` (full distributions) or ``-1`` (per-teacher scalars).
TEACHER_FIELDS: dict[str, int] = {"teacher_logits": -2, "teacher_logprobs": -2, "sampled_logprobs": -1, "safety": -1}

#: Which scale each signal belongs to (``safety`` and ``mask`` are shared by all scales).
SCALE_FIELDS: dict[str, tuple[str, ...]] = {
    "token": ("teacher_logits", "teacher_logprobs", "sampled_logprobs", "labels", "student_logits"),
    "task": ("task_ids",),
    "context": ("context",),
}


def _fused_sum(t: Tensor) -> Tensor:
    """Σ t in at least single precision (half-precision sums would overflow at 65504)."""
    return t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()


def all_finite(t: Tensor) -> bool:
    """True iff no entry of ``t`` is NaN or ±inf, from one reduction: Σ t is NaN/±inf iff an entry is, unless the
    sum of finite entries overflows; only then the exact elementwise scan runs. Non-float tensors are finite."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if torch.compiler.is_compiling():  # inside a graph: a device-side assert (solvers.errors.holds)
        return holds(torch.isfinite(t).all(), "NaN or inf in a tensor checked inside a compiled graph")
    return bool(torch.isfinite(_fused_sum(t))) or bool(torch.isfinite(t).all())


def no_nan_or_posinf(t: Tensor) -> bool:
    """True iff no entry of ``t`` is NaN or +inf (−inf allowed: log-probabilities), from one reduction: Σ t is NaN
    or +inf iff an entry is (+inf − inf = NaN), unless finite entries overflow to +inf; only then the exact scan
    runs. Non-float tensors pass."""
    if not t.is_floating_point():
        return True
    if torch.compiler.is_compiling():  # as in all_finite
        return holds(~(torch.isnan(t) | (t == math.inf)).any(), "NaN or +inf in a tensor checked inside a compiled "
                     "graph")
    s = _fused_sum(t)
    return not (bool(torch.isnan(s)) or bool(s == math.inf)) or not bool((torch.isnan(t) | (t == math.inf)).any())


class MissingSignalError(ValueError):
    """An operator was called without a signal it declares in ``requires`` (no silent fallback)."""


@dataclass
class Signals:
    """Inputs of weighting operators; every field is optional and operators declare what they read."""

    teacher_logits: Tensor | None = None
    teacher_logprobs: Tensor | None = None
    sampled_logprobs: Tensor | None = None
    labels: Tensor | None = None
    task_ids: Tensor | None = None
    context: Tensor | None = None
    safety: Tensor | None = None
    student_logits: Tensor | None = None
    mask: Tensor | None = None

    # ------------------------------------------------------------------ access
    def has(self, name: str) -> bool:
        """True when ``name`` is available; ``teacher_logprobs`` is available from ``teacher_logits`` too."""
        if name == "teacher_logprobs":
            return self.teacher_logprobs is not None or self.teacher_logits is not None
        return getattr(self, name) is not None

    def require(self, names: Iterable[str], who: str) -> None:
        """Raise `MissingSignalError` naming the first field of ``names`` that is absent."""
        for name in sorted(names):
            if name not in SIGNAL_FIELDS:
                raise ValueError(f"{who}: unknown signal field {name!r}; known: {SIGNAL_FIELDS}")
            if not self.has(name):
                hint = ""
                if name in ("teacher_logprobs", "teacher_logits") and self.sampled_logprobs is not None:
                    hint = " (only sampled-token log-probs are present; this operator needs full teacher distributions)"
                raise MissingSignalError(f"{who} needs signal {name!r}, which is None{hint}")

    def logprobs(self) -> Tensor:
        """Teacher log-probabilities ``[..., K, V]`` (``log_softmax`` of the logits when only logits are given)."""
        if self.teacher_logprobs is not None:
            return self.teacher_logprobs
        if self.teacher_logits is not None:
            return torch.log_softmax(self.teacher_logits, dim=-1)
        raise MissingSignalError("signal 'teacher_logprobs' (or 'teacher_logits') is None")

    def gold_logprobs(self) -> Tensor:
        """``log p_k(y)`` ``[..., K]`` for the gold label: ``sampled_logprobs`` when given (the log-prob at the
        label, e.g. from a sparse teacher cache), else gathered from the full distributions. Positions whose label
        is negative (``-100``: not counted) give 0 and are never used as an index."""
        if self.labels is None:
            raise MissingSignalError("signal 'labels' is None (gold-likelihood weights need the gold token)")
        if self.sampled_logprobs is not None:
            return self.sampled_logprobs
        if self.teacher_logprobs is not None or self.teacher_logits is not None:
            lp = self.logprobs()
            y = self.labels.long()
            idx = y.clamp_min(0).unsqueeze(-1).unsqueeze(-1).expand(*lp.shape[:-1], 1)
            return torch.where((y >= 0).unsqueeze(-1), lp.gather(-1, idx).squeeze(-1), lp.new_zeros(()))
        raise MissingSignalError("signal 'teacher_logprobs' (or 'sampled_logprobs' at the label) is None")

    # ------------------------------------------------------------------ shape inference
    def num_teachers(self) -> int | None:
        """K inferred from the teacher-indexed fields, or None."""
        for name, axis in TEACHER_FIELDS.items():
            t = getattr(self, name)
            if t is not None and t.dim() >= 1:
                return int(t.shape[axis])
        return None

    def batch_shape(self) -> torch.Size | None:
        """The leading ``[...]`` shape shared by all fields, or None when no field fixes it."""
        for name, drop in (("teacher_logits", 2), ("teacher_logprobs", 2), ("sampled_logprobs", 1),
                           ("student_logits", 1), ("labels", 0), ("task_ids", 0), ("mask", 0), ("context", 1)):
            t = getattr(self, name)
            if t is not None:
                return t.shape[: t.dim() - drop]
        return None

    def reference(self) -> Tensor | None:
        """Any present tensor (for device/dtype), floating ones first."""
        present = [getattr(self, n) for n in SIGNAL_FIELDS if getattr(self, n) is not None]
        floats = [t for t in present if t.is_floating_point()]
        return (floats or present or [None])[0]

    # ------------------------------------------------------------------ validation and transforms
    def validate(self) -> None:
        """Check NaN/inf and shape agreement; errors name the offending field."""
        K = self.num_teachers()
        for name, axis in TEACHER_FIELDS.items():
            t = getattr(self, name)
            if t is not None and int(t.shape[axis]) != K:
                raise ValueError(f"signal {name!r} has {t.shape[axis]} teachers on axis {axis}, expected {K}")
        for name in ("teacher_logits", "student_logits", "context", "safety"):
            t = getattr(self, name)
            if t is not None and not all_finite(t):
                raise ValueError(f"signal {name!r} contains NaN or inf")
        for name in ("teacher_logprobs", "sampled_logprobs"):
            t = getattr(self, name)
            if t is not None and not no_nan_or_posinf(t):
                raise ValueError(f"signal {name!r} contains NaN or +inf (log-probabilities must be <= 0 or -inf)")
        for name in ("labels", "task_ids"):
            t = getattr(self, name)
            if t is not None and t.is_floating_point():
                raise ValueError(f"signal {name!r} must be an integer tensor, got {t.dtype}")
        if self.teacher_logits is not None and self.teacher_logprobs is not None:
            if self.teacher_logits.shape != self.teacher_logprobs.shape:
                raise ValueError("signals 'teacher_logits' and 'teacher_logprobs' disagree in shape")

    def replace(self, **changes: Tensor | None) -> "Signals":
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def permute_teachers(self, perm: Tensor) -> "Signals":
        """Relabel teachers: every teacher-indexed field is reindexed by ``perm`` ``[K]``."""
        changes = {}
        for name, axis in TEACHER_FIELDS.items():
            t = getattr(self, name)
            if t is not None:
                changes[name] = t.index_select(t.dim() + axis, perm.to(t.device))
        return self.replace(**changes)
