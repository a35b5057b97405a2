"""Context-scale operator: teacher weights from a domain posterior over context features."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from safekd.targets.signals import Signals
from safekd.targets.weighting.base import Scale, WeightOperator

__all__ = ["DomainPosterior"]


class DomainPosterior(WeightOperator):
    """Context/domain posterior (AMTML-KD instance-embedding
    softmax): teacher k is the expert of domain k and

    * classifier: ``g = classifier(c)`` (logits ``[..., K]``, so ``softmax(g) = π(domain | c)``);
    * rule: ``g_k = −‖c − μ_k‖₂ / h`` (nearest-centroid with bandwidth h; ``L_g = √F/h`` in ℓ∞ of c).

    ``classifier_lipschitz`` (ℓ∞ → ℓ∞ of the classifier logits) is the user's declaration, if any.
    """

    scale: Scale = "context"
    requires = frozenset({"context"})
    permutation_equivariant = False

    def __init__(self, num_teachers: int, classifier: Callable[[Tensor], Tensor] | None = None,
                 centroids: Tensor | None = None, bandwidth: float = 1.0,
                 classifier_lipschitz: float | None = None, context_dim: int | None = None,
                 beta: float = 1.0, epsilon: float = 0.0) -> None:
        if (classifier is None) == (centroids is None):
            raise ValueError("give exactly one of classifier or centroids")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        super().__init__(beta=beta, epsilon=epsilon, num_teachers=num_teachers)
        self.classifier = classifier
        self.bandwidth = float(bandwidth)
        self.classifier_lipschitz = classifier_lipschitz
        if centroids is not None:
            c = torch.as_tensor(centroids, dtype=torch.get_default_dtype())
            if c.dim() != 2 or c.shape[0] != num_teachers:
                raise ValueError(f"centroids must have shape [num_teachers={num_teachers}, F], got {tuple(c.shape)}")
            if not bool(torch.isfinite(c).all()):
                raise ValueError("centroids contain NaN or inf")
            self.register_buffer("centroids", c)
            context_dim = c.shape[1]
        else:
            self.centroids = None
        self.context_dim = context_dim

    def scores(self, s: Signals) -> Tensor:
        c = s.context
        if self.context_dim is not None and c.shape[-1] != self.context_dim:
            raise ValueError(f"context must have {self.context_dim} features on its last axis, got {c.shape[-1]}")
        if self.centroids is not None:
            mu = self.centroids.to(device=c.device, dtype=c.dtype)
            return -torch.linalg.vector_norm(c.unsqueeze(-2) - mu, dim=-1) / self.bandwidth
        logits = self.classifier(c)
        if logits.shape != (*c.shape[:-1], self.num_teachers):
            raise ValueError(f"classifier must map context [..., F] to logits [..., {self.num_teachers}], "
                             f"got {tuple(logits.shape)}")
        return logits

    def score_lipschitz(self) -> float | None:
        if self.centroids is not None:
            return math.sqrt(self.centroids.shape[1]) / self.bandwidth
        return self.classifier_lipschitz

    def lipschitz_wrt(self) -> tuple[str, ...]:
        return ("context",)
