"""Token-scale operators: scores from each position's teacher distributions (and gold token / student).

All are batched over ``[..., K, V]``; constants are w.r.t. teacher (and student) logits in ℓ∞.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from safekd.targets.signals import Signals
from safekd.targets.weighting.base import WeightOperator

logger = logging.getLogger(__name__)

__all__ = [
    "ConfidenceSoftmax",
    "EntropySoftmax",
    "AgreementSoftmax",
    "GoldLikelihood",
    "CAMKD",
    "MTBert",
    "LOGP_FLOOR",
]

LOGP_FLOOR = -1.0e4  # scores built from log p(y) are clamped here so that p(y)=0 gives a finite score


class ConfidenceSoftmax(WeightOperator):
    """``g_k = max_v p_k(v)`` (NeMo RL ``sum_weights_metric``).

    ``g ∈ [1/V, 1]`` (width ≤ 1); ``‖∇_z max softmax(z)‖₁ = 2p_max(1−p_max) ≤ 1/2``, so ``L_g = 1/2`` in logits.
    """

    requires = frozenset({"teacher_logprobs"})

    def scores(self, s: Signals) -> Tensor:
        return s.logprobs().amax(dim=-1).exp()

    def score_width(self) -> float | None:
        return 1.0

    def score_lipschitz(self) -> float | None:
        return 0.5

    def lipschitz_wrt(self) -> tuple[str, ...]:
        return ("teacher_logits",)


class EntropySoftmax(WeightOperator):
    """``g_k = −H(p_k)/log V`` (entropy weighting, Kwon et al. ICASSP 2020 (EBKD)).

    ``g ∈ [−1, 0]``; ``‖∇_z H‖₁ = E_p|log p + H| ≤ 2H ≤ 2 log V``, so ``L_g = 2`` in logits.
    Needs full teacher distributions (sampled-token log-probs are not enough).
    """

    requires = frozenset({"teacher_logprobs"})

    def scores(self, s: Signals) -> Tensor:
        lp = s.logprobs()
        V = lp.shape[-1]
        if V < 2:
            raise ValueError("EntropySoftmax needs a vocabulary of size >= 2 (teacher_logprobs last axis)")
        ent = -torch.where(lp > -math.inf, lp.exp() * lp, lp.new_zeros(())).sum(-1)
        return -ent / math.log(V)

    def score_width(self) -> float | None:
        return 1.0

    def score_lipschitz(self) -> float | None:
        return 2.0

    def lipschitz_wrt(self) -> tuple[str, ...]:
        return ("teacher_logits",)


def _kl_terms(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """``Σ_v p (log p − log q)`` with ``0·log 0 = 0``; shapes broadcast, sum over the last axis."""
    diff = torch.where(p_logp > -math.inf, p_logp - q_logp, p_logp.new_zeros(()))
    return (p_logp.exp() * diff).sum(-1)


class AgreementSoftmax(WeightOperator):
    """``g_k = −JS(p_k, p̄)/log 2`` with ``p̄ = mean_k p_k`` (agreement with the mean teacher;
    disagreement score). ``g ∈ [−1, 0]``; ``L_g = (2 log 2 + 1)/log 2`` in logits.
    """

    requires = frozenset({"teacher_logprobs"})

    def scores(self, s: Signals) -> Tensor:
        lp = s.logprobs()
        K = lp.shape[-2]
        lbar = torch.logsumexp(lp, dim=-2, keepdim=True) - math.log(K)
        lm = torch.logaddexp(lp, lbar) - math.log(2.0)
        js = 0.5 * (_kl_terms(lp, lm) + _kl_terms(lbar, lm))
        return -js / math.log(2.0)

    def score_width(self) -> float | None:
        return 1.0

    def score_lipschitz(self) -> float | None:
        return (2.0 * math.log(2.0) + 1.0) / math.log(2.0)

    def lipschitz_wrt(self) -> tuple[str, ...]:
        return ("teacher_logits",)


class GoldLikelihood(WeightOperator):
    """``g_k = log p_k(y)`` (softmax of −CE: NeMo RL ``sum_weights_metric``; correctness weighting, Wu et al. 2022).
    With β=1, ε=0: ``w_k ∝ p_k(y)``. ``‖∇_z log p_y‖₁ = 2(1−p_y) ≤ 2``, so ``L_g = 2``.
    Scores are unbounded, so bounded influence needs ε > 0 (``w_min = ε/K``).
    """

    requires = frozenset({"teacher_logprobs", "labels"})

    def scores(self, s: Signals) -> Tensor:
        return s.gold_logprobs().clamp_min(LOGP_FLOOR)

    def score_lipschitz(self) -> float | None:
        return 2.0

    def lipschitz_wrt(self) -> tuple[str, ...]:
        return ("teacher_logits",)


class CAMKD(WeightOperator):
    """``w_k = (1 − softmax_k(β·CE))/(K−1)`` with ``CE_k = −log p_k(y)`` (CA-MKD, Zhang, Chen & Wang,
    ICASSP 2022), then uniform mixing ε. β=1 is the paper.

    β acts inside (on CE), so the outer softmax has β=1 and ``scores = log(1 − softmax(β·CE))``.
    ``w_k ∈ [ε/K, ε/K + (1−ε)/(K−1)]``; ``‖Δw‖₁ ≤ (1−ε)·2β/(K−1)·‖Δz‖_∞``.
    """

    requires = frozenset({"teacher_logprobs", "labels"})

    @property
    def template_beta(self) -> float:
        return 1.0

    def scores(self, s: Signals) -> Tensor:
        ce = -s.gold_logprobs().clamp_min(LOGP_FLOOR)
        if ce.shape[-1] < 2:
            raise ValueError("CAMKD needs at least 2 teachers")
        x = self.beta * ce
        K = x.shape[-1]
        eye = torch.eye(K, dtype=torch.bool, device=x.device)
        others = x.unsqueeze(-2).expand(*x.shape[:-1], K, K).masked_fill(eye, -math.inf)
        # log(1 − softmax(x)_k) = logsumexp_{j≠k} x_j − logsumexp_j x_j  (stable; [..., K, K] with K small)
        return torch.logsumexp(others, dim=-1) - torch.logsumexp(x, dim=-1, keepdim=True)

    def weight_bounds(self, K: int) -> tuple[float, float, float | None]:
        u = self.epsilon / K
        hi = u + (1.0 - self.epsilon) / max(K - 1, 1)
        return u, hi, (hi / u if u > 0 else None)

    def weight_lipschitz(self, K: int) -> float | None:
        return (1.0 - self.epsilon) * 2.0 * self.beta / max(K - 1, 1)

    def lipschitz_wrt(self) -> tuple[str, ...]:
        return ("teacher_logits",)


class MTBert(WeightOperator):
    """``w_k ∝ (1 + CE_k)^{−β}`` i.e. ``g_k = −log(1 + CE_k)`` (MT-BERT, Wu, Wu & Huang, Findings of ACL 2021);
    β=1 gives the paper's ``1/(1+CE)``. ``L_g = 2`` in logits; scores unbounded (use ε > 0).
    """

    requires = frozenset({"teacher_logprobs", "labels"})

    def scores(self, s: Signals) -> Tensor:
        ce = -s.gold_logprobs().clamp_min(LOGP_FLOOR)
        return -torch.log1p(ce)

    def score_lipschitz(self) -> float | None:
        return 2.0

    def lipschitz_wrt(self) -> tuple[str, ...]:
        return ("teacher_logits",)
