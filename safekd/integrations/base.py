"""What the framework adapters share: a logits view of models that return output objects, and the scalars a step
reports.

The adapters drive a plain :class:`~safekd.distiller.SafeDistiller` through its two-phase API: per micro-batch,
``lagrangian, pending = distiller.loss(batch)`` (teacher logits, weights, projection, pooled target, KD loss,
Lagrangian) and ``record = distiller.finish_step(pending)`` (dual step, record, step log); the framework scales
the Lagrangian for gradient accumulation, back-propagates it (through DDP where used), clips and steps. Calling
``finish_step`` before the framework's backward is sound: λ_{t+1} is computed from the residual measured at θ_t,
which does not depend on when θ_{t+1} is formed. ``spec.dual.every`` counts micro-batches.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from safekd.training.distiller import StepRecord

__all__ = ["LogitsOf", "record_metrics", "weighting_to"]


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



def weighting_to(weighting: nn.Module | Mapping[str, nn.Module] | None, device: torch.device | str
                 ) -> nn.Module | Mapping[str, nn.Module] | None:
    """``weighting`` (one operator or ``{scale: operator}``) with every ``nn.Module`` operator moved to ``device``;
    other callables and None pass through."""
    if isinstance(weighting, nn.Module):
        return weighting.to(device)
    if isinstance(weighting, Mapping):
        return {s: op.to(device) if isinstance(op, nn.Module) else op for s, op in weighting.items()}
    return weighting
