"""Weighting-operator protocol: scale, required signals, declared constants, ``(1-ε)·softmax(β·scores)+ε/K``.

Declared constants (safekd's reconstruction): for scores ``g ∈ [a, b]^K`` the template gives
``w_k ∈ [ε/K + (1-ε)/(1+(K-1)e^{βΔ}), ε/K + (1-ε)/(1+(K-1)e^{-βΔ})]`` with ``Δ = b - a``, and softmax has
ℓ∞→ℓ1 constant ≤ 1, so ``‖Δw‖₁ ≤ (1-ε)·β·L_g·‖Δs‖_∞`` when the scores are ``L_g``-Lipschitz in the signal ``s``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from safekd.targets.signals import Signals

logger = logging.getLogger(__name__)

__all__ = [
    "Scale",
    "SafetyMode",
    "DeclaredConstants",
    "WeightOperator",
    "mix_softmax",
    "template_bounds",
    "AXIOM_NAMES",
]

Scale = Literal["token", "task", "context"]
SafetyMode = Literal["none", "own", "comonotone", "ordinal"]

#: Weight axioms an operator may claim (W1–W6).
AXIOM_NAMES: tuple[str, ...] = (
    "normalization",
    "bounded_influence",
    "continuity",
    "safety_own_score",
    "safety_comonotone",
    "safety_ordinal",
    "permutation_equivariance",
    "scale_separation",
)

_SAFETY_CLAIMS: dict[str, frozenset[str]] = {
    # an operator that does not read safety satisfies all three readings weakly
    "none": frozenset({"safety_own_score", "safety_comonotone", "safety_ordinal"}),
    "own": frozenset({"safety_own_score"}),
    "comonotone": frozenset({"safety_own_score", "safety_comonotone"}),
    "ordinal": frozenset({"safety_own_score", "safety_comonotone", "safety_ordinal"}),
}


@dataclass(frozen=True)
class DeclaredConstants:
    """Constants an operator promises for ``K`` teachers; ``None`` means "not declared".

    ``lipschitz`` bounds ``‖W(s) − W(s′)‖₁ / ‖s − s′‖_∞`` where ``s`` ranges over the signal fields named in
    ``lipschitz_wrt`` (perturbed jointly); ``lipschitz_norm`` spells the norms out for reports.
    """

    w_min: float | None = None
    w_max: float | None = None
    ratio_bound: float | None = None
    lipschitz: float | None = None
    lipschitz_norm: str = "linf->l1"
    lipschitz_wrt: tuple[str, ...] = ()
    safety_mode: SafetyMode = "none"
    permutation_equivariant: bool = True
    num_teachers: int | None = None
    claims: frozenset[str] = field(default_factory=frozenset)


def mix_softmax(scores: Tensor, beta: float, epsilon: float) -> Tensor:
    """``(1-ε)·softmax(β·scores) + ε/K`` over the last axis (−inf scores get weight ε/K)."""
    K = scores.shape[-1]
    w = torch.softmax(beta * scores, dim=-1)
    if epsilon:
        w = (1.0 - epsilon) * w + epsilon / K
    return w


def template_bounds(K: int, beta: float, epsilon: float,
                    score_width: float | None) -> tuple[float, float, float | None]:
    """``(w_min, w_max, ratio_bound)`` of the template for scores of range width ``score_width`` (None = unbounded)."""
    u = epsilon / K
    if score_width is None or math.isinf(score_width):
        return u, 1.0 - epsilon + u, (None if epsilon == 0 else (1.0 - epsilon + u) / u)
    e = math.exp(beta * score_width)
    lo = u + (1.0 - epsilon) / (1.0 + (K - 1) * e)
    hi = u + (1.0 - epsilon) / (1.0 + (K - 1) / e)
    return lo, hi, hi / lo if lo > 0 else None


class WeightOperator(nn.Module):
    """Maps `Signals` to teacher weights ``[..., K]`` on the simplex.

    Subclasses set ``scale`` and ``requires`` and implement `scores`; `forward` applies
    ``(1-ε)·softmax(β·scores) + ε/K``. `declared` returns the constants for ``K`` teachers
    (``constants`` uses ``num_teachers`` when the operator knows it).
    """

    scale: Scale = "token"
    requires: frozenset[str] = frozenset()
    #: Per-teacher parameters (a table, static weights, ...) break permutation equivariance.
    permutation_equivariant: ClassVar[bool] = True
    #: Operators whose scores read the student are not fixed targets.
    depends_on_student: ClassVar[bool] = False

    def __init__(self, beta: float = 1.0, epsilon: float = 0.0, num_teachers: int | None = None,
                 validate_args: bool = True) -> None:
        super().__init__()
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        if not (0.0 <= epsilon <= 1.0):
            raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
        if num_teachers is not None and num_teachers < 1:
            raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
        self.beta = float(beta)
        self.epsilon = float(epsilon)
        self.num_teachers = num_teachers
        self.validate_args = validate_args

    # ---------------------------------------------------------------- protocol
    def scores(self, s: Signals) -> Tensor:
        """Unnormalised log-weights ``[..., K]``."""
        raise NotImplementedError

    def forward(self, s: Signals) -> Tensor:
        """Weights ``(1-ε)·softmax(β·scores(s)) + ε/K``, shape ``[..., K]``."""
        self.check_signals(s)
        return mix_softmax(self.scores(s), self.template_beta, self.epsilon)

    @property
    def template_beta(self) -> float:
        """The β of the outer softmax (an operator that applies β inside its scores returns 1)."""
        return self.beta

    def check_signals(self, s: Signals) -> None:
        """Raise `MissingSignalError` for absent required fields; validate values when ``validate_args``."""
        s.require(self.requires, type(self).__name__)
        if self.validate_args:
            s.validate()
            K = s.num_teachers()
            if K is not None and self.num_teachers is not None and K != self.num_teachers:
                raise ValueError(f"{type(self).__name__} was built for {self.num_teachers} teachers, signals have {K}")

    # ---------------------------------------------------------------- constants
    def score_width(self) -> float | None:
        """Width ``b − a`` of the range of `scores` (None = unbounded)."""
        return None

    def score_lipschitz(self) -> float | None:
        """``L_g``: ℓ∞→ℓ∞ Lipschitz constant of `scores` in the fields of `lipschitz_wrt` (None = not declared)."""
        return None

    def lipschitz_wrt(self) -> tuple[str, ...]:
        """Continuous signal fields the continuity constant refers to."""
        return ()

    def safety_mode(self) -> SafetyMode:
        """How the operator reads teacher safety scores (the three readings of W4)."""
        return "none"

    def weight_lipschitz(self, K: int) -> float | None:
        """``(1-ε)·β·L_g`` (softmax is 1-Lipschitz ℓ∞→ℓ1)."""
        L = self.score_lipschitz()
        return None if L is None else (1.0 - self.epsilon) * self.template_beta * L

    def weight_bounds(self, K: int) -> tuple[float, float, float | None]:
        """``(w_min, w_max, ratio_bound)`` for ``K`` teachers."""
        return template_bounds(K, self.template_beta, self.epsilon, self.score_width())

    def declared(self, K: int) -> DeclaredConstants:
        """Constants for ``K`` teachers, and the axioms the operator claims."""
        w_min, w_max, ratio = self.weight_bounds(K)
        L = self.weight_lipschitz(K)
        mode = self.safety_mode()
        claims = {"normalization", "scale_separation"} | set(_SAFETY_CLAIMS[mode])
        if w_min > 0:
            claims.add("bounded_influence")
        if L is not None or not self.lipschitz_wrt():
            claims.add("continuity")
        if self.permutation_equivariant:
            claims.add("permutation_equivariance")
        else:
            # ceteris paribus includes per-teacher parameters (tables, static weights), which differ
            claims.discard("safety_comonotone")
        return DeclaredConstants(
            w_min=w_min, w_max=w_max, ratio_bound=ratio, lipschitz=L, lipschitz_wrt=self.lipschitz_wrt(),
            safety_mode=mode, permutation_equivariant=self.permutation_equivariant, num_teachers=K,
            claims=frozenset(claims),
        )

    @property
    def constants(self) -> DeclaredConstants:
        """`declared` for ``num_teachers`` (K-dependent bounds are None when K is unknown)."""
        if self.num_teachers is None:
            d = self.declared(2)
            return DeclaredConstants(lipschitz=d.lipschitz, lipschitz_wrt=d.lipschitz_wrt,
                                     safety_mode=d.safety_mode, permutation_equivariant=d.permutation_equivariant,
                                     claims=d.claims)
        return self.declared(self.num_teachers)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, beta={self.beta}, epsilon={self.epsilon}"
