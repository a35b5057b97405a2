"""Ordinal safety prior: add ``γ·rank(σ)`` to any operator's scores (ordinal safety monotonicity by construction)."""
from __future__ import annotations

import dataclasses

from torch import Tensor

from safekd.targets.signals import Signals
from safekd.targets.weighting.base import DeclaredConstants, SafetyMode, WeightOperator, template_bounds

__all__ = ["ordinal_rank", "SafetyPrior"]


def ordinal_rank(safety: Tensor) -> Tensor:
    """0-based average ranks over the last axis: ``r_k = #{j: σ_j < σ_k} + ½·#{j≠k: σ_j = σ_k}``.

    Invariant to every strictly increasing map of ``σ``; ties share the average rank.
    """
    a = safety.unsqueeze(-1)  # σ_k
    b = safety.unsqueeze(-2)  # σ_j
    less = (b < a).to(safety.dtype).sum(-1)
    ties = (b == a).to(safety.dtype).sum(-1) - 1.0
    return less + 0.5 * ties


class SafetyPrior(WeightOperator):
    """``scores = base.scores + γ·rank(σ)`` then ``(1-ε)·softmax(β·scores) + ε/K`` with the base's β and ε
    ("safety prior", ordinal safety monotonicity). Higher σ = safer. Reads σ only through its order, so it meets
    own-score monotonicity and ordinal invariance, and comonotonicity ceteris paribus when the base is
    permutation-equivariant. Continuity is declared in the base's signals only (rank is a step function of σ).
    """

    def __init__(self, base: WeightOperator, gamma: float = 1.0) -> None:
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        super().__init__(beta=base.beta, epsilon=base.epsilon, num_teachers=base.num_teachers,
                         validate_args=base.validate_args)
        self.base = base
        self.gamma = float(gamma)
        self.scale = base.scale
        self.requires = base.requires | {"safety"}
        self.permutation_equivariant = base.permutation_equivariant
        self.depends_on_student = base.depends_on_student

    @property
    def template_beta(self) -> float:
        return self.base.template_beta

    def scores(self, s: Signals) -> Tensor:
        base = self.base.scores(s)
        rank = ordinal_rank(s.safety.to(base.dtype).to(base.device))
        return base + self.gamma * rank

    def weight_bounds(self, K: int) -> tuple[float, float, float | None]:
        """The template's bounds for the base's score width widened by the rank term's ``γ·(K−1)``."""
        width = self.base.score_width()
        return template_bounds(K, self.template_beta, self.epsilon,
                               None if width is None else width + self.gamma * (K - 1))

    def score_lipschitz(self) -> float | None:
        return self.base.score_lipschitz()

    def lipschitz_wrt(self) -> tuple[str, ...]:
        return self.base.lipschitz_wrt()

    def safety_mode(self) -> SafetyMode:
        return "ordinal" if self.base.permutation_equivariant else "own"

    def declared(self, K: int) -> DeclaredConstants:
        d = super().declared(K)
        if self.base.safety_mode() not in ("none", "ordinal"):
            return d
        return dataclasses.replace(d, claims=d.claims | {"safety_ordinal"})

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"
