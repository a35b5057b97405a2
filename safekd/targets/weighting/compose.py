"""Product-structure composition of per-scale weights: ``w ∝ Π_s (w^s)^{λ_s}``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from solvers.errors import holds

__all__ = ["Composition", "compose", "SCALES"]

SCALES: tuple[str, ...] = ("token", "task", "context")


@dataclass
class Composition:
    """Composite weights ``[..., K]`` and the per-scale factors that made them (kept for logging)."""

    weights: Tensor
    log_weights: Tensor
    per_scale: dict[str, Tensor] = field(default_factory=dict)
    exponents: dict[str, float] = field(default_factory=dict)


def compose(token: Tensor | None = None, task: Tensor | None = None, context: Tensor | None = None,
            exponents: Mapping[str, float] | None = None, validate_args: bool = True) -> Composition:
    """Normalised product in log space: ``log w = Σ_s λ_s log w^s − logsumexp_k(Σ_s λ_s log w^s_k)``.

    Factors broadcast over leading dims; a uniform factor is neutral; the result does not depend on the
    order of the arguments (factors are summed in the fixed order token, task, context). Exponents
    default to 1 (exponents other than 1 are a safekd extension).
    """
    factors = {name: w for name, w in (("token", token), ("task", task), ("context", context)) if w is not None}
    if not factors:
        raise ValueError("compose needs at least one of token=, task=, context=")
    lam = {name: 1.0 for name in factors}
    for name, value in (exponents or {}).items():
        if name not in SCALES:
            raise ValueError(f"exponents has unknown scale {name!r}; scales are {SCALES}")
        if not value >= 0:
            raise ValueError(f"exponent for {name!r} must be >= 0, got {value}")
        if name in lam:
            lam[name] = float(value)
    K = {w.shape[-1] for w in factors.values()}
    if len(K) != 1:
        raise ValueError(f"factors disagree on the number of teachers: " +
                         ", ".join(f"{n}: {w.shape[-1]}" for n, w in factors.items()))
    if validate_args:
        for name, w in factors.items():
            if not holds(~(torch.isnan(w) | (w < 0)).any(), f"{name} weights contain NaN or negative entries"):
                raise ValueError(f"{name} weights contain NaN or negative entries")
    total = None
    for name in SCALES:
        if name not in factors:
            continue
        lw = torch.log(factors[name])
        # exponent 0 removes the factor entirely, also where it is zero (0·log 0 := 0)
        term = torch.where(lw > -torch.inf, lam[name] * lw, lw) if lam[name] else torch.zeros_like(lw)
        total = term if total is None else total + term
    norm = torch.logsumexp(total, dim=-1, keepdim=True)
    if validate_args and not holds(~torch.isneginf(norm).any(), "the factors have disjoint supports at some "
                                                                 "position"):
        raise ValueError("the factors have disjoint supports at some position (every teacher gets weight 0 "
                         "from some scale); the normalised product is undefined there")
    log_w = total - norm
    return Composition(weights=log_w.exp(), log_weights=log_w, per_scale=dict(factors), exponents=lam)
