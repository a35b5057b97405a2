"""Constraint measurement with sufficient statistics: sums and counts, all-reduced, rates formed late.

A student constraint's measurement at a batch is a :class:`MeasurementSums` — a differentiable ``proxy_sum``
(drives the student's gradient), a detached ``value_sum`` (the true measurement; drives the multiplier) and a
``count``. Rates ``value_sum / count`` are formed only after :func:`reduce_sums_counts`, so they are exact under
gradient accumulation and DDP (summing counts across ranks is exact; averaging per-rank rates is not).
:class:`ConstraintMeter` accumulates sums over a window (``update`` / ``compute`` / ``reset``, as torchmetrics).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from safekd.common.distributed import all_reduce_sums

__all__ = ["MeasurementSums", "ConstraintMeter", "reduce_sums_counts"]


@dataclass(frozen=True)
class MeasurementSums:
    """One constraint measured on one batch: Σ proxy (differentiable), Σ value (detached) and the count."""

    proxy_sum: Tensor
    value_sum: Tensor
    count: Tensor

    @property
    def value(self) -> Tensor:
        """Local rate Σ value / count (0 when the count is 0)."""
        return self.value_sum / self.count.clamp_min(1)

    @property
    def proxy(self) -> Tensor:
        """Local differentiable rate Σ proxy / count (0 when the count is 0)."""
        return self.proxy_sum / self.count.clamp_min(1)


def reduce_sums_counts(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Σ over ranks of ``sums [J]`` and ``counts [J]`` in one ``all_reduce(SUM)`` of the stacked ``[2, J]`` tensor
    (:func:`safekd.distributed.all_reduce_sums`; the identity on one process). Inputs are detached."""
    if sums.shape != counts.shape:
        raise ValueError(f"reduce_sums_counts: `sums` shape {tuple(sums.shape)} != `counts` shape {tuple(counts.shape)}")
    stacked = all_reduce_sums(torch.stack([sums.detach(), counts.detach().to(sums.dtype)]))
    return stacked[0], stacked[1]


class ConstraintMeter:
    """Windowed sums and counts for J named constraints: ``update`` adds, ``compute`` reduces across ranks and
    forms rates ``Σ value / Σ count`` (local state is kept, so accumulation continues), ``reset`` empties.

    ``sync=False`` when the caller already feeds globally reduced sums (``compute`` then does not reduce again).
    """

    def __init__(self, names: Sequence[str], *, sync: bool = True, dtype: torch.dtype = torch.float64,
                 device: torch.device | None = None) -> None:
        self.names = tuple(names)
        self.sync = sync
        self.value_sum = torch.zeros(len(self.names), dtype=dtype, device=device)
        self.count = torch.zeros(len(self.names), dtype=dtype, device=device)
        self.updates = 0

    def update(self, value_sums: Tensor, counts: Tensor) -> None:
        """Add one batch's ``value_sums [J]`` and ``counts [J]`` (local, not yet reduced)."""
        if value_sums.shape != self.value_sum.shape or counts.shape != self.count.shape:
            raise ValueError(f"ConstraintMeter.update: expected shapes {tuple(self.value_sum.shape)}, got "
                             f"value_sums {tuple(value_sums.shape)} and counts {tuple(counts.shape)}")
        self.value_sum += value_sums.detach().to(self.value_sum)
        self.count += counts.detach().to(self.count)
        self.updates += 1

    def compute(self) -> tuple[Tensor, Tensor]:
        """(rates [J], counts [J]) over the window, summed across ranks (if ``sync``); a rate with count 0 is 0."""
        sums, counts = (reduce_sums_counts(self.value_sum, self.count) if self.sync
                        else (self.value_sum.clone(), self.count.clone()))
        return sums / counts.clamp_min(1), counts

    def reset(self) -> None:
        self.value_sum.zero_()
        self.count.zero_()
        self.updates = 0

    def state_dict(self) -> dict[str, object]:
        return {"names": list(self.names), "value_sum": self.value_sum.clone(), "count": self.count.clone(),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if list(state["names"]) != list(self.names):  # type: ignore[arg-type]
            raise ValueError(f"ConstraintMeter.load_state_dict: constraint names {state['names']} != {list(self.names)}")
        self.value_sum.copy_(state["value_sum"])  # type: ignore[arg-type]
        self.count.copy_(state["count"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[arg-type]
