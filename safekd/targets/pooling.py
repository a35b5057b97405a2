"""Pooling of teacher distributions with weights, in log space (companion paper arXiv 2601.09165).

Every pool maps teacher log-probabilities ``[..., K, V]`` and weights ``[..., K]`` to target log-probabilities
``[..., V]``:

* linear      ``q = Σ_k w_k p_k``                          (logsumexp over K: one ``[..., K, V]`` temporary)
* geometric   ``q ∝ Π_k p_k^{w_k}``                         (a batched matmul over K: no ``[..., K, V]`` temporary)
* tempered    ``q ∝ (Π_k p_k^{w_k})^{1/(1+λ)}``             (entropic projection, λ ≥ 0)
* power-mean  ``q ∝ (Σ_k w_k p_k^r)^{1/r}``                  (r=1 linear, r→0 geometric)

Zero probabilities (``-inf`` log-probs) are handled exactly: in a linear pool they are ignored when another
teacher covers the token; in geometric/tempered pools a teacher with ``w_k > 0`` and ``p_k(v) = 0`` vetoes v.
`soften` applies per-teacher temperatures ``F_T(p) ∝ p^{1/T}`` and `topk_buckets` coarsens large vocabularies
to the union of the teachers' top-k tokens plus one tail bucket.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from safekd.targets.signals import no_nan_or_posinf

__all__ = [
    "linear_pool",
    "geometric_pool",
    "tempered_pool",
    "power_mean_pool",
    "soften",
    "log1mexp",
    "TopKBuckets",
    "topk_buckets",
    "Pool",
    "LinearPool",
    "GeometricPool",
    "TemperedPool",
    "PowerMeanPool",
    "POOL_AXIOMS",
]

#: Aggregation axioms a pool may claim (the companion paper's A1–A5; strong/weak variants separate).
POOL_AXIOMS: tuple[str, ...] = (
    "simplex_output",
    "idempotence",
    "hull_membership",
    "positivity_all",
    "positivity_any",
    "continuity",
    "weight_monotonicity_forward",
    "weight_monotonicity_reverse",
    "temperature_coherence_strong",
    "temperature_coherence_weak",
)


def _weights(teacher_logp: Tensor, weights: Tensor, validate_args: bool) -> Tensor:
    """``weights`` in the dtype of ``teacher_logp``, after the shape and value checks when ``validate_args``."""
    if not validate_args:
        return weights.to(teacher_logp.dtype)
    if teacher_logp.dim() < 2:
        raise ValueError(f"teacher_logp must have shape [..., K, V], got {tuple(teacher_logp.shape)}")
    K = teacher_logp.shape[-2]
    if weights.shape[-1] != K:
        raise ValueError(f"weights must have shape [..., K={K}], got {tuple(weights.shape)}")
    if not no_nan_or_posinf(teacher_logp):
        raise ValueError("teacher_logp contains NaN or +inf")
    if bool(torch.isnan(weights).any()) or bool((weights < 0).any()):
        raise ValueError("weights contain NaN or negative entries")
    return weights.to(teacher_logp.dtype)


def linear_pool(teacher_logp: Tensor, weights: Tensor, validate_args: bool = True) -> Tensor:
    """``log q = logsumexp_k(log w_k + log p_k)`` — the linear opinion pool ``q = Σ_k w_k p_k``."""
    w = _weights(teacher_logp, weights, validate_args)
    info = torch.finfo(teacher_logp.dtype)
    if (torch.is_grad_enabled() and (teacher_logp.requires_grad or w.requires_grad)) or info.tiny / info.eps > 1e-30:
        # with autograd, or in float16 (whose normal range ends at 6e-5): in log space
        return torch.logsumexp(torch.log(w).unsqueeze(-1) + teacher_logp, dim=-2)
    return _linear_pool_probs(teacher_logp, w)


def _linear_pool_probs(teacher_logp: Tensor, w: Tensor) -> Tensor:
    """The pool without autograd (float32/64, bfloat16), in probability space: ``log(w @ exp(log p))`` — one pass
    fewer over the ``[..., K, V]`` tensor than ``logsumexp``, and no ``[..., K, V]`` temporary besides
    ``exp(log p)``. Equal to the log-space formula up to rounding wherever ``q ≥ tiny/eps`` (any term lost to
    underflow there is below ``eps·q``); the rarer smaller entries are recomputed with ``logsumexp`` over the
    teachers, so ``log q`` stays exact and finite down to ``q = 0`` (``−inf`` only where every weighted teacher
    gives probability 0)."""
    q = torch.einsum("...k,...kv->...v", w, teacher_logp.exp())
    info = torch.finfo(q.dtype)
    small = q < info.tiny / info.eps
    out = q.log_()
    if torch.compiler.is_compiling():  # inside a graph: the log-space pool on every entry, taken where q is small
        return torch.where(small, torch.logsumexp(torch.log(w).unsqueeze(-1) + teacher_logp, dim=-2), out)
    if bool(small.any()):
        idx = small.nonzero(as_tuple=True)
        lead = idx[:-1]
        terms = torch.log(w[lead]) + teacher_logp.movedim(-2, -1)[idx]  # [n, K]
        out[idx] = torch.logsumexp(terms, dim=-1)
    return out


def _weighted_logp(teacher_logp: Tensor, w: Tensor, validate_args: bool) -> Tensor:
    """``Σ_k w_k log p_k`` ``[..., V]`` with ``0·(−inf) := 0`` and ``w_k > 0, p_k(v) = 0 ⇒ −inf`` (veto)."""
    w_row = w.unsqueeze(-2)
    if not bool(torch.isneginf(teacher_logp).any()):
        return (w_row @ teacher_logp).squeeze(-2)
    floor = torch.finfo(teacher_logp.dtype).min
    s = (w_row @ teacher_logp.clamp_min(floor)).squeeze(-2)
    veto = (torch.isneginf(teacher_logp) & (w > 0).unsqueeze(-1)).any(-2)
    s = s.masked_fill(veto, -math.inf)
    if validate_args and bool(veto.all(-1).any()):
        raise ValueError("geometric pool undefined: the weighted teachers have disjoint supports at some position "
                         "(every token has zero probability under some teacher with positive weight)")
    return s


def geometric_pool(teacher_logp: Tensor, weights: Tensor, validate_args: bool = True) -> Tensor:
    """``log q = Σ_k w_k log p_k − log Z`` (logarithmic pool / product of experts, renormalised over V)."""
    w = _weights(teacher_logp, weights, validate_args)
    return torch.log_softmax(_weighted_logp(teacher_logp, w, validate_args), dim=-1)


def tempered_pool(teacher_logp: Tensor, weights: Tensor, lam: float = 0.0, validate_args: bool = True) -> Tensor:
    """Entropic projection ``argmin_q Σ_k w_k KL(q‖p_k) + λ KL(q‖u)``: ``log q = (Σ_k w_k log p_k)/(1+λ) − log Z``."""
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    w = _weights(teacher_logp, weights, validate_args)
    return torch.log_softmax(_weighted_logp(teacher_logp, w, validate_args) / (1.0 + lam), dim=-1)


def power_mean_pool(teacher_logp: Tensor, weights: Tensor, r: float = 0.5, validate_args: bool = True) -> Tensor:
    """``log q = (1/r)·logsumexp_k(log w_k + r log p_k) − log Z``; ``r = 0`` is the geometric pool."""
    if not math.isfinite(r):
        raise ValueError(f"r must be finite, got {r}")
    if r == 0:
        return geometric_pool(teacher_logp, weights, validate_args)
    w = _weights(teacher_logp, weights, validate_args)
    lw = torch.log(w).unsqueeze(-1)
    terms = lw + r * teacher_logp
    if r < 0:  # w_k = 0 must drop teacher k even where p_k(v) = 0 (−inf + inf)
        terms = torch.where(lw > -math.inf, terms, terms.new_full((), -math.inf))
    return torch.log_softmax(torch.logsumexp(terms, dim=-2) / r, dim=-1)


def soften(teacher_logp: Tensor, temperatures: Tensor | float) -> Tensor:
    """Per-teacher softening ``F_T(p) ∝ p^{1/T}``: ``log_softmax(log p_k / T_k)``.

    ``temperatures``: a scalar, ``[K]`` or ``[..., K]``.
    """
    T = torch.as_tensor(temperatures, dtype=teacher_logp.dtype, device=teacher_logp.device)
    if bool((T <= 0).any()) or not bool(torch.isfinite(T).all()):
        raise ValueError(f"temperatures must be finite and > 0, got {T.tolist()}")
    if T.dim() >= 1:
        T = T.unsqueeze(-1)
    return torch.log_softmax(teacher_logp / T, dim=-1)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − e^x)`` for ``x ≤ 0``, stable on both sides of ``−log 2`` and NaN-free in backward."""
    x = x.clamp_max(-torch.finfo(x.dtype).tiny)
    near = x > -math.log(2.0)
    a = torch.where(near, x, torch.full_like(x, -math.log(2.0)))
    b = torch.where(near, torch.full_like(x, -math.log(2.0)), x)
    return torch.where(near, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


@dataclass
class TopKBuckets:
    """A coarsened support: ``ids [..., M]`` (union of per-teacher top-k, ``M = K·k``; duplicates have
    ``valid = False``) and ``teacher_logp [..., K, M+1]`` (the last bucket is the tail ``1 − Σ_top p``)."""

    ids: Tensor
    valid: Tensor
    teacher_logp: Tensor

    def coarsen(self, logp: Tensor) -> Tensor:
        """Map full log-probabilities ``[..., V]`` (or ``[..., K, V]``) onto the buckets ``[..., M+1]``."""
        extra = logp.dim() - self.ids.dim()
        ids, valid = self.ids, self.valid
        for _ in range(extra):
            ids, valid = ids.unsqueeze(-2), valid.unsqueeze(-2)
        ids = ids.expand(*logp.shape[:-1], ids.shape[-1])
        top = logp.gather(-1, ids).masked_fill(~valid, -math.inf)
        tail = log1mexp(torch.logsumexp(top, dim=-1, keepdim=True))
        return torch.cat([top, tail], dim=-1)

    def student(self, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
        """Student log-probabilities ``[..., M+1]`` on the same buckets (softened at ``temperature`` first)."""
        return self.coarsen(torch.log_softmax(student_logits / temperature, dim=-1))


def topk_buckets(teacher_logp: Tensor, k: int) -> TopKBuckets:
    """Keep the union of each teacher's top-``k`` tokens and lump the rest into one tail bucket (TRL
    ``loss_add_tail``), so pools and divergences run on ``[..., K, K·k + 1]``."""
    V = teacher_logp.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must lie in [1, V={V}], got {k}")
    ids = teacher_logp.topk(k, dim=-1).indices.flatten(-2)  # [..., K·k]
    ids, _ = ids.sort(dim=-1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[..., 1:] = ids[..., 1:] != ids[..., :-1]
    buckets = TopKBuckets(ids=ids, valid=valid, teacher_logp=teacher_logp.new_empty(0))
    buckets.teacher_logp = buckets.coarsen(teacher_logp)
    return buckets


class Pool(nn.Module):
    """Module wrapper: optional per-teacher temperatures, then the pool. ``claims`` lists the axioms it meets."""

    name: str = "pool"
    claims: frozenset[str] = frozenset()

    def __init__(self, temperatures: Tensor | list[float] | None = None, validate_args: bool = True) -> None:
        super().__init__()
        self.validate_args = validate_args
        if temperatures is None:
            self.temperatures = None
        else:
            self.register_buffer("temperatures", torch.as_tensor(temperatures, dtype=torch.get_default_dtype()))

    def pool(self, teacher_logp: Tensor, weights: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, teacher_logp: Tensor, weights: Tensor) -> Tensor:
        if self.temperatures is not None:
            teacher_logp = soften(teacher_logp, self.temperatures)
        return self.pool(teacher_logp, weights)


_CORE = frozenset({"simplex_output", "idempotence", "positivity_all", "continuity", "temperature_coherence_weak"})


class LinearPool(Pool):
    """``q = Σ_k w_k p_k`` (linear opinion pool)."""

    name = "linear"
    claims = _CORE | {"hull_membership", "positivity_any", "weight_monotonicity_forward"}

    def pool(self, teacher_logp: Tensor, weights: Tensor) -> Tensor:
        return linear_pool(teacher_logp, weights, self.validate_args)


class GeometricPool(Pool):
    """``q ∝ Π_k p_k^{w_k}`` (logarithmic pool)."""

    name = "geometric"
    claims = _CORE | {"weight_monotonicity_forward", "weight_monotonicity_reverse", "temperature_coherence_strong"}

    def pool(self, teacher_logp: Tensor, weights: Tensor) -> Tensor:
        return geometric_pool(teacher_logp, weights, self.validate_args)


class TemperedPool(Pool):
    """``q ∝ (Π_k p_k^{w_k})^{1/(1+λ)}`` (entropic projection; not idempotent for λ > 0)."""

    name = "tempered"

    def __init__(self, lam: float = 0.5, temperatures: Tensor | list[float] | None = None,
                 validate_args: bool = True) -> None:
        super().__init__(temperatures, validate_args)
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = float(lam)
        self.claims = frozenset({"simplex_output", "positivity_all", "continuity", "temperature_coherence_strong"}
                                | ({"idempotence"} if lam == 0 else set()))

    def pool(self, teacher_logp: Tensor, weights: Tensor) -> Tensor:
        return tempered_pool(teacher_logp, weights, self.lam, self.validate_args)


class PowerMeanPool(Pool):
    """``q ∝ (Σ_k w_k p_k^r)^{1/r}`` (power-mean family; r=1 linear, r→0 geometric)."""

    name = "power_mean"
    claims = _CORE

    def __init__(self, r: float = 0.5, temperatures: Tensor | list[float] | None = None,
                 validate_args: bool = True) -> None:
        super().__init__(temperatures, validate_args)
        self.r = float(r)

    def pool(self, teacher_logp: Tensor, weights: Tensor) -> Tensor:
        return power_mean_pool(teacher_logp, weights, self.r, self.validate_args)
