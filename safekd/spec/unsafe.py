"""The unsafe set U ⊂ 𝒱 and the unsafe mass p(U) = Σ_{v∈U} p(v) of a distribution.

U may be given as token ids (LM vocabularies), class indices (classifiers; the same thing for the code) or a
callable ``fn(batch, vocab_size) -> BoolTensor`` broadcastable to ``[..., V]`` (a per-position mask over the
vocabulary, e.g. when what is unsafe depends on the context).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from solvers.errors import holds

__all__ = ["UnsafeSet", "cap_unsafe_mass"]

MaskFn = Callable[[Mapping[str, Any] | None, int], Tensor]


class UnsafeSet:
    """U as sorted unique indices, or as a callable mask ``fn(batch, V) -> Bool[..., V]``.

    ``mass(logp)`` gives p(U) = Σ_{v∈U} exp(logp_v) over the last axis; ``log_mass(logp)`` its logarithm by an
    exact log-sum-exp (finite for masses below the floating-point range).
    """

    def __init__(self, ids: Sequence[int] | Tensor | None = None, *, fn: MaskFn | None = None,
                 name: str | None = None) -> None:
        if (ids is None) == (fn is None):
            raise ValueError("UnsafeSet: give exactly one of `ids` (token ids / class indices) or `fn` (mask callable)")
        self.fn = fn
        self.name = name or (getattr(fn, "__name__", "unsafe_mask") if fn is not None else None)
        if ids is not None:
            t = torch.as_tensor(ids).reshape(-1)
            if t.numel() == 0:
                raise ValueError("UnsafeSet: `ids` is empty; an empty unsafe set makes every unsafe constraint vacuous")
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"UnsafeSet: `ids` must be integer token ids, got dtype {t.dtype}")
            if bool((t < 0).any()):
                raise ValueError(f"UnsafeSet: `ids` must be non-negative, got min {int(t.min())}")
            self.ids: Tensor | None = torch.unique(t.long())
        else:
            if not callable(fn):
                raise TypeError(f"UnsafeSet: `fn` must be callable, got {type(fn).__name__}")
            self.ids = None

    @classmethod
    def coerce(cls, value: "UnsafeSet | Sequence[int] | Tensor | MaskFn") -> "UnsafeSet":
        """Accept an UnsafeSet, a sequence/tensor of ids, or a mask callable."""
        if isinstance(value, UnsafeSet):
            return value
        if callable(value) and not isinstance(value, Tensor):
            return cls(fn=value)
        return cls(ids=value)

    def _check_ids(self, vocab_size: int) -> None:
        assert self.ids is not None
        if not holds(self.ids[-1] < vocab_size, f"UnsafeSet: a token id is out of range for vocabulary size "
                                                  f"{vocab_size}"):
            raise ValueError(f"UnsafeSet: token id {int(self.ids[-1])} is out of range for vocabulary size {vocab_size}")

    def mask(self, vocab_size: int, batch: Mapping[str, Any] | None = None, *,
             device: torch.device | None = None) -> Tensor:
        """Boolean mask over the vocabulary: ``[V]`` for ids, ``[..., V]`` (broadcastable) for a callable."""
        if self.ids is not None:
            self._check_ids(vocab_size)
            m = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            m[self.ids.to(device)] = True
            return m
        assert self.fn is not None
        m = torch.as_tensor(self.fn(batch, vocab_size), device=device)
        if m.dtype != torch.bool:
            raise ValueError(f"UnsafeSet {self.name!r}: the mask callable must return a bool tensor, got {m.dtype}")
        if m.shape[-1] != vocab_size:
            raise ValueError(f"UnsafeSet {self.name!r}: mask last dim {m.shape[-1]} != vocabulary size {vocab_size}")
        return m

    def _select(self, logp: Tensor) -> Tensor:
        """``logp[..., U]`` for an id set, gathered on a 2-D view (index_select over the last axis of a 4-D tensor is
        ~3× slower)."""
        V = logp.shape[-1]
        self._check_ids(V)
        assert self.ids is not None
        return logp.reshape(-1, V).index_select(1, self.ids.to(logp.device)).view(*logp.shape[:-1], -1)

    def _masked(self, logp: Tensor, batch: Mapping[str, Any] | None, teacher_axis: bool) -> Tensor:
        """``logp`` with −inf off U for a mask callable (``teacher_axis``: broadcast a per-position mask over K)."""
        m = self.mask(logp.shape[-1], batch, device=logp.device)
        if teacher_axis and m.dim() >= 2:
            m = m.unsqueeze(-2)
        return logp.masked_fill(~m, float("-inf"))

    def mass(self, logp: Tensor, batch: Mapping[str, Any] | None = None, *, teacher_axis: bool = False) -> Tensor:
        """p(U) = Σ_{v∈U} exp(logp[..., v]) for log-probabilities ``logp [..., V]`` → ``[...]`` (differentiable).

        ``teacher_axis=True`` when ``logp`` is ``[..., K, V]``: a per-position mask ``[..., V]`` is then broadcast
        over the teacher axis.
        """
        if self.ids is not None:
            return self._select(logp).exp().sum(-1)  # log p ≤ 0: no overflow
        return torch.logsumexp(self._masked(logp, batch, teacher_axis), dim=-1).exp()

    def log_mass(self, logp: Tensor, batch: Mapping[str, Any] | None = None, *, teacher_axis: bool = False) -> Tensor:
        """log p(U) = logsumexp_{v∈U} logp[..., v] (exact in log space); arguments as in :meth:`mass`."""
        if self.ids is not None:
            return torch.logsumexp(self._select(logp), dim=-1)
        return torch.logsumexp(self._masked(logp, batch, teacher_axis), dim=-1)

    def mass_from_logits(self, logits: Tensor, log_normalizer: Tensor | None = None,
                         batch: Mapping[str, Any] | None = None) -> Tensor:
        """p(U) = exp(logsumexp_{v∈U} z_v − logsumexp_v z_v) straight from logits ``[..., V]`` (no full log-softmax);
        ``log_normalizer`` ``[...]`` may be passed when already computed."""
        lse = torch.logsumexp(logits, dim=-1) if log_normalizer is None else log_normalizer
        return (self.log_mass(logits, batch) - lse).exp()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description: ``{"ids": [...]}`` or ``{"fn": name}`` (a callable is referenced by name)."""
        if self.ids is not None:
            return {"ids": [int(i) for i in self.ids.tolist()]}
        return {"fn": self.name}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UnsafeSet):
            return NotImplemented
        if self.ids is not None and other.ids is not None:
            return torch.equal(self.ids, other.ids)
        return self.fn is other.fn and self.ids is None and other.ids is None

    def __hash__(self) -> int:
        return hash(tuple(self.ids.tolist())) if self.ids is not None else hash(self.fn)

    def __repr__(self) -> str:
        if self.ids is not None:
            shown = self.ids[:8].tolist()
            more = "" if self.ids.numel() <= 8 else f", ... ({self.ids.numel()} ids)"
            return f"UnsafeSet(ids={shown}{more})"
        return f"UnsafeSet(fn={self.name})"


def cap_unsafe_mass(logq: Tensor, in_unsafe: Tensor, eps: float, log_count: Tensor | None = None,
                    rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Distributions ``logq [..., M]`` (log-probabilities) whose unsafe mass q(U) exceeds ε, rescaled onto it:
    q ← q·ε/q(U) on U and q·(1−ε)/(1−q(U)) off U; where q(U) = 1 the safe mass 1 − ε is spread uniformly over the
    safe tokens (an entry standing for ``exp(log_count)`` tokens, e.g. a tail bucket, gets that many shares).
    ``in_unsafe`` (bool) broadcasts to ``logq``; ``rows`` (bool ``[...]``) limits the correction to those rows.
    Returns ``(logq', need [...])``: ``logq'`` equals ``logq`` on the rows not corrected (``need`` False: outside
    ``rows``, or q(U) ≤ ε·(1 + 1e-6))."""
    neg = logq.new_full((), -math.inf)
    log_u = torch.logsumexp(torch.where(in_unsafe, logq, neg), dim=-1, keepdim=True)
    log_s = torch.logsumexp(torch.where(in_unsafe, neg, logq), dim=-1, keepdim=True)
    need = log_u.squeeze(-1).exp() > eps * (1 + 1e-6)
    if rows is not None:
        need = need & rows
    count = torch.zeros_like(logq) if log_count is None else log_count.to(logq.dtype).expand_as(logq)
    log_n_safe = torch.logsumexp(torch.where(in_unsafe, neg, count), dim=-1, keepdim=True)
    safe = torch.where(log_s > neg, logq - log_s, count - log_n_safe) + math.log1p(-eps)
    unsafe = logq + math.log(eps) - log_u if eps > 0 else neg.expand_as(logq)
    return torch.where(need.unsqueeze(-1), torch.where(in_unsafe, unsafe, safe), logq), need
