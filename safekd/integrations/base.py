"""What the framework adapters share: a distiller whose primal step belongs to the framework, a logits view of
models that return output objects, and the scalars a step reports.

:class:`FrameworkDistiller` runs :meth:`SafeDistiller.step <safekd.distiller.SafeDistiller.step>` unchanged —
teacher logits, weights, projection, pooled target, KD loss, Lagrangian, dual step, record, step log — except
that it neither zeroes gradients, nor calls backward, nor steps the student's optimizer: it hands the Lagrangian
to the framework, which scales it for gradient accumulation, back-propagates (through DDP where used), clips and
steps. The dual step still follows the primal rule: λ_{t+1} is computed from the residual measured at θ_t, which
does not depend on when θ_{t+1} is formed. ``spec.dual.every`` counts micro-batches.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from safekd.distiller import SafeDistiller, StepRecord

__all__ = ["FrameworkDistiller", "LogitsOf", "record_metrics"]


class LogitsOf(nn.Module):
    """``forward(inputs) = model(**{input_key: inputs}).logits``: a logits tensor from models that return output
    objects (Hugging Face ``ModelOutput``, tuples whose first item is the logits, or plain tensors)."""

    def __init__(self, model: Callable[..., Any], input_key: str = "input_ids") -> None:
        super().__init__()
        self.model = model
        self.input_key = input_key

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.model(**{self.input_key: inputs})
        if isinstance(out, Tensor):
            return out
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            logits = out[0]
        if not isinstance(logits, Tensor):
            raise TypeError(f"{type(self.model).__name__} returned {type(out).__name__} without a 'logits' tensor")
        return logits


class FrameworkDistiller(SafeDistiller):
    """A :class:`SafeDistiller` for training loops that own ``zero_grad``, backward and the optimizer step.

    :meth:`step` returns the :class:`StepRecord` as usual and leaves the differentiable Lagrangian in
    :meth:`take_loss` for the framework to back-propagate. ``optimizer`` is the framework's optimizer (kept for
    ``state_dict``; this class never steps it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss: Tensor | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Only the multipliers' gradients: the framework zeroes the student's (after gradient accumulation)."""
        if self.dual_optimizer is not None:
            self.dual_optimizer.zero_grad(set_to_none=set_to_none)

    def _primal_step(self, loss: Tensor) -> None:
        self._loss = loss

    def take_loss(self) -> Tensor:
        """The Lagrangian of the last :meth:`step` (differentiable); each step's loss can be taken once."""
        if self._loss is None:
            raise RuntimeError("take_loss() needs a step(batch) first (and returns each step's loss once)")
        loss, self._loss = self._loss, None
        return loss


def record_metrics(record: StepRecord, prefix: str = "safekd/") -> dict[str, float]:
    """Flat scalars of a step record for a framework's logger: the KD loss and penalty, each constraint's
    ``value``, ``residual`` and ``multiplier``, and each teacher's mean weight after projection (``weight``) and
    before it (``weight_composed``)."""
    out = {f"{prefix}kd_loss": float(record.kd_loss), f"{prefix}penalty": float(record.penalty)}
    for name, c in record.constraints.items():
        for key in ("value", "residual", "multiplier"):
            out[f"{prefix}{name}/{key}"] = float(c[key])
    for stage, key in (("projected", "weight"), ("composed", "weight_composed")):
        for teacher, w in record.weights.get(stage, {}).items():
            out[f"{prefix}{key}/{teacher}"] = float(w)
    return out

