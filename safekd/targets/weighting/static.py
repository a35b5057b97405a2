"""Signal-independent operators: uniform and static (user-given) weights; usable at any scale."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from safekd.targets.signals import MissingSignalError, Signals
from safekd.targets.weighting.base import Scale, WeightOperator

__all__ = ["Uniform", "Static", "broadcast_scores"]


def broadcast_scores(s: Signals, row: Tensor) -> Tensor:
    """Broadcast per-teacher scores ``row`` ``[K]`` to ``[*batch, K]`` of the signals ``s``, on their device and
    (floating) dtype."""
    shape = s.batch_shape()
    ref = s.reference()
    if ref is not None:
        row = row.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else row.dtype)
    if shape is None:
        return row
    return row.expand(*shape, row.shape[-1])


class Uniform(WeightOperator):
    """``w_k = 1/K`` (Hinton et al. 2015). Neutral element of `compose`."""

    requires = frozenset()

    def __init__(self, num_teachers: int | None = None, scale: Scale = "token") -> None:
        super().__init__(beta=1.0, epsilon=0.0, num_teachers=num_teachers)
        self.scale = scale

    def scores(self, s: Signals) -> Tensor:
        K = s.num_teachers() or self.num_teachers
        if K is None:
            raise MissingSignalError("Uniform: no teacher-indexed signal and num_teachers is None; pass num_teachers")
        return broadcast_scores(s, torch.zeros(K))

    def score_width(self) -> float | None:
        return 0.0

    def score_lipschitz(self) -> float | None:
        return 0.0


class Static(WeightOperator):
    """User-given weights normalised onto Δ_K: ``w ∝ (1-ε)·softmax(β·log v) + ε/K`` (NeMo RL / ModelOpt).

    With β=1, ε=0 this is ``w = v / Σ v``. Teacher identity matters, so it is not permutation-equivariant.
    """

    requires = frozenset()
    permutation_equivariant = False

    def __init__(self, weights: Tensor | list[float], beta: float = 1.0, epsilon: float = 0.0,
                 scale: Scale = "task") -> None:
        v = torch.as_tensor(weights, dtype=torch.get_default_dtype())
        if v.dim() != 1 or v.numel() < 1:
            raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()) or float(v.sum()) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all zero, got {v.tolist()}")
        super().__init__(beta=beta, epsilon=epsilon, num_teachers=v.numel())
        self.scale = scale
        self.register_buffer("log_weights", torch.log(v / v.sum()))

    def scores(self, s: Signals) -> Tensor:
        K = s.num_teachers()
        if K is not None and K != self.num_teachers:
            raise ValueError(f"Static has {self.num_teachers} weights but the signals have {K} teachers")
        return broadcast_scores(s, self.log_weights)

    def score_width(self) -> float | None:
        finite = self.log_weights[torch.isfinite(self.log_weights)]
        if finite.numel() < self.log_weights.numel():
            return math.inf
        return float(finite.max() - finite.min())

    def score_lipschitz(self) -> float | None:
        return 0.0
