"""Distillation divergences between a target distribution and the student, with masks, T² scaling and
token-count bookkeeping that stays exact under gradient accumulation and data parallelism.

Every function takes ``(target_logp [..., V], student_logits [..., V], mask=None, temperature=1.0)`` (and
``student_logp = log_softmax(student_logits / temperature)`` when the caller has it already, to share one student
normaliser with other terms of its loss) and returns a `DivergenceOutput` with ``sum`` (Σ over unmasked tokens of
the per-token divergence, times T²) and ``count`` (number of unmasked tokens). Accumulate sums and counts over
micro-batches/ranks and divide once (`DivergenceOutput.mean`, `DivergenceOutput.normalized`). At
``temperature = T`` the student is ``log_softmax(z/T)`` and, unless ``soften_target=False`` (target already
tempered, e.g. pooled from `safekd.pooling.soften`-ed teachers), the target is
``F_T(target) = log_softmax(target_logp/T)``. Zero probabilities (−inf) are handled exactly (``0·log 0 = 0``);
a target token the student gives zero probability yields +inf in forward KL, never NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from safekd.targets.signals import no_nan_or_posinf

__all__ = [
    "DivergenceOutput",
    "kl_per_token",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_kl",
    "tvd",
    "DIVERGENCES",
    "Divergence",
]


@dataclass
class DivergenceOutput:
    """``sum`` (scalar, T²-scaled, masked), ``count`` (int64 scalar), ``per_token`` ``[...]`` (0 where masked)."""

    sum: Tensor
    count: Tensor
    per_token: Tensor

    @property
    def mean(self) -> Tensor:
        """``sum / count`` (0 when no token is unmasked)."""
        return self.sum / self.count.clamp_min(1).to(self.sum.dtype)

    def normalized(self, total_count: Tensor | int) -> Tensor:
        """``sum / total_count``: divide each micro-batch by the token count of the whole accumulated batch,
        so that the accumulated gradient equals the gradient of the full-batch token mean."""
        return self.sum / torch.as_tensor(total_count, dtype=self.sum.dtype, device=self.sum.device).clamp_min(1)

    def __add__(self, other: "DivergenceOutput") -> "DivergenceOutput":
        per_token = torch.cat([self.per_token.reshape(-1), other.per_token.reshape(-1)])
        return DivergenceOutput(self.sum + other.sum, self.count + other.count, per_token)


def kl_per_token(a_logp: Tensor, b_logp: Tensor) -> Tensor:
    """``KL(a‖b) = Σ_v a_v (log a_v − log b_v)`` over the last axis, with ``0·log 0 = 0`` (NaN-free gradients).

    Fast path: the plain formula, with no masking ``where`` in the graph. A term with ``a_v = 0`` there is
    ``0·(−inf − log b_v) = NaN``; a NaN row sends the call to the masked formula (``0·log 0 = 0``)."""
    per_token = (a_logp.exp() * (a_logp - b_logp)).sum(-1)
    if not bool(per_token.isnan().any()):
        return per_token
    diff = torch.where(a_logp > -math.inf, a_logp - b_logp, a_logp.new_zeros(()))
    return (a_logp.exp() * diff).sum(-1)


def _prepare(target_logp: Tensor, student_logits: Tensor, mask: Tensor | None, temperature: float,
             soften_target: bool, validate_args: bool, student_logp: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if target_logp.shape != student_logits.shape:
        raise ValueError(f"target_logp {tuple(target_logp.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} must have the same shape [..., V]")
    if mask is not None and mask.shape != target_logp.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(target_logp.shape[:-1])}, got {tuple(mask.shape)}")
    if validate_args:
        if not no_nan_or_posinf(target_logp):
            raise ValueError("target_logp contains NaN or +inf")
        if not no_nan_or_posinf(student_logits):
            raise ValueError("student_logits contains NaN or +inf")
    if student_logp is not None:
        if student_logp.shape != student_logits.shape:
            raise ValueError(f"student_logp {tuple(student_logp.shape)} must have the shape of student_logits "
                             f"{tuple(student_logits.shape)}")
        lq = student_logp
    else:  # z / 1.0 == z bit for bit: skip the [..., V] copy (and its backward) at the default temperature
        lq = torch.log_softmax(student_logits if temperature == 1.0 else student_logits / temperature, dim=-1)
    lp = target_logp
    if soften_target and temperature != 1.0:
        lp = torch.log_softmax(target_logp / temperature, dim=-1)
    lp = lp.to(lq.dtype)
    keep = torch.ones(lq.shape[:-1], dtype=torch.bool, device=lq.device) if mask is None else mask.to(torch.bool)
    return lp, lq, keep


def _finish(per_token: Tensor, keep: Tensor, temperature: float) -> DivergenceOutput:
    scaled = per_token if temperature == 1.0 else per_token * (temperature ** 2)
    per_token = torch.where(keep, scaled, per_token.new_zeros(()))
    return DivergenceOutput(sum=per_token.sum(), count=keep.sum(), per_token=per_token)


def forward_kl(target_logp: Tensor, student_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0,
               soften_target: bool = True, validate_args: bool = True, student_logp: Tensor | None = None,
        ) -> DivergenceOutput:
    """Forward KL ``T²·KL(p‖q)`` (Hinton et al. 2015): mode-covering."""
    lp, lq, keep = _prepare(target_logp, student_logits, mask, temperature, soften_target, validate_args,
                            student_logp)
    return _finish(kl_per_token(lp, lq), keep, temperature)


def reverse_kl(target_logp: Tensor, student_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0,
               soften_target: bool = True, validate_args: bool = True, student_logp: Tensor | None = None,
        ) -> DivergenceOutput:
    """Reverse KL ``T²·KL(q‖p)`` (MiniLLM, Gu et al. 2024): mode-seeking."""
    lp, lq, keep = _prepare(target_logp, student_logits, mask, temperature, soften_target, validate_args,
                            student_logp)
    return _finish(kl_per_token(lq, lp), keep, temperature)


def generalized_jsd(target_logp: Tensor, student_logits: Tensor, mask: Tensor | None = None,
                    temperature: float = 1.0, beta: float = 0.5, soften_target: bool = True,
                    validate_args: bool = True, student_logp: Tensor | None = None) -> DivergenceOutput:
    """``JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m)``, ``m = βp + (1−β)q`` (GKD, Agarwal et al. ICLR 2024); following
    TRL, ``β = 0`` is forward ``KL(p‖q)`` and ``β = 1`` reverse ``KL(q‖p)``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    lp, lq, keep = _prepare(target_logp, student_logits, mask, temperature, soften_target, validate_args,
                            student_logp)
    if beta == 0.0:
        return _finish(kl_per_token(lp, lq), keep, temperature)
    if beta == 1.0:
        return _finish(kl_per_token(lq, lp), keep, temperature)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return _finish(beta * kl_per_token(lp, lm) + (1.0 - beta) * kl_per_token(lq, lm), keep, temperature)


def skew_kl(target_logp: Tensor, student_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0,
            alpha: float = 0.1, reverse: bool = False, soften_target: bool = True,
            validate_args: bool = True, student_logp: Tensor | None = None) -> DivergenceOutput:
    """Skew KL (DistiLLM, Ko et al. ICML 2024): ``KL(p ‖ αp + (1−α)q)``, or with ``reverse=True``
    ``KL(q ‖ (1−α)p + αq)``; finite even where the other distribution has zeros (α > 0)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    lp, lq, keep = _prepare(target_logp, student_logits, mask, temperature, soften_target, validate_args,
                            student_logp)
    if alpha == 0.0:
        mixed = lq if not reverse else lp
    elif not reverse:
        mixed = torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha))
    else:
        mixed = torch.logaddexp(lp + math.log1p(-alpha), lq + math.log(alpha))
    per_token = kl_per_token(lq, mixed) if reverse else kl_per_token(lp, mixed)
    return _finish(per_token, keep, temperature)


def tvd(target_logp: Tensor, student_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0,
        soften_target: bool = True, validate_args: bool = True, student_logp: Tensor | None = None,
        ) -> DivergenceOutput:
    """Total variation ``T²·½Σ_v |p_v − q_v|``."""
    lp, lq, keep = _prepare(target_logp, student_logits, mask, temperature, soften_target, validate_args,
                            student_logp)
    return _finish(0.5 * (lp.exp() - lq.exp()).abs().sum(-1), keep, temperature)


DIVERGENCES: dict[str, Callable[..., DivergenceOutput]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "tvd": tvd,
}


class Divergence(nn.Module):
    """Module wrapper: ``Divergence("jsd", temperature=2.0, beta=0.5)(target_logp, student_logits, mask)``."""

    def __init__(self, name: str = "forward_kl", temperature: float = 1.0, **params: float | bool) -> None:
        super().__init__()
        if name not in DIVERGENCES:
            raise ValueError(f"unknown divergence {name!r}; choose from {sorted(DIVERGENCES)}")
        self.name, self.temperature, self.params = name, float(temperature), dict(params)
        self._fn = DIVERGENCES[name]

    def forward(self, target_logp: Tensor, student_logits: Tensor, mask: Tensor | None = None) -> DivergenceOutput:
        return self._fn(target_logp, student_logits, mask=mask, temperature=self.temperature, **self.params)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, temperature={self.temperature}, params={self.params}"
