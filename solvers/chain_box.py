"""Fixed-shape, sync-free projection onto box ∩ simplex ∩ an ordinal chain, with a KKT certificate per row.

Per row: ``w = argmin ½‖w − v‖²`` s.t. ``Σw = 1``, ``lo ≤ w ≤ hi`` and the chain rows ``w[π_{k+1}] − w[π_k] ≤ 0``
for every linked pair (those of :meth:`~solvers.sets.FeasibleSet.order_by`; an unlinked pair splits the chain).

Candidate: ``w = clamp(iso(v) − τ, lo, hi)`` (``iso`` along π per linked segment, :mod:`solvers.isotonic`) with
``τ`` from the exact box∩simplex breakpoint search on ``iso(v)``: ``iso(y − τ) = iso(y) − τ``, and ``clamp(iso(y),
lo, hi) = P_{box∩chain}(y)`` wherever no bound cuts strictly inside a block of ``iso`` (bounds constant on each
linked segment, or inactive inside blocks). Order-consistent bounds (nonincreasing along π) do NOT suffice:
``y = (−1, 1)``, ``lo = (½, 0)`` gives ``clamp(iso(y)) = (½, 0)`` but ``P(y) = (½, ½)``. The certificate decides.

Certificate (chain order, ``d = w − v + τ``): stationarity ``w − v + τ1 + Σ_k μ_k (e_{π_{k+1}} − e_{π_k}) − ν⁻ + ν⁺
= 0`` reads ``μ_i − μ_{i−1} = d_i + ν⁺_i − ν⁻_i`` (``μ_{−1} = μ_{K−1} = 0``; ``ν⁺ ≥ 0`` only at an upper bound,
``ν⁻ ≥ 0`` only at a lower one) with ``μ_k = 0`` on pairs that are unlinked or not tight: difference constraints on
μ, whose least solution is the larger of two running bounds (off the lower bound ``μ_k ≥ μ_{k−1} + d_k``, off the
upper bound ``μ_k ≥ μ_{k+1} − d_{k+1}``, both ≥ 0: Lindley recursions in closed form). Then ``ν = u − clamp(u, lo,
hi)`` for ``u = v − τ − Σ_k μ_k (e_{π_{k+1}} − e_{π_k})``, and the KKT residual is the largest of ``|Σw − 1|``, the
box and chain violations, ``|min(μ_k, w[π_k] − w[π_{k+1}])|`` (linked pairs) and ``‖w − clamp(u, lo, hi)‖∞ /
max(1, ‖v‖∞)``. ``(τ, μ ≥ 0, ν)`` are explicit multipliers, so a certified row (residual ≤ ``tol``) is the exact
projection of data moved by at most ``tol`` (``v`` by the stationarity error, bounds and rows by the primal and
complementarity errors), however the candidate was found: a wrong candidate cannot be certified. Certification is
conservative: where ``τ`` is not unique (every coordinate at a bound) and the one picked admits no μ, or the
candidate is not the projection (a bound cuts inside a block), the row fails and belongs to an exact general path.

No host synchronisation: :func:`~solvers.isotonic.isotonic_decreasing` branches on shapes only (``K == 1``,
``n == 0``, its loop over row chunks of a size fixed by ``K``) and the rest is a fixed sequence of batched ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from solvers.isotonic import isotonic_decreasing
from solvers.projection import _euclid_box_simplex_u

__all__ = ["ChainBoxResult", "project_chain_box"]


@dataclass(frozen=True)
class ChainBoxResult:
    """``w [n, K]``; ``chain_mu [n, K−1] ≥ 0``, the multipliers of the rows ``w[π_{k+1}] − w[π_k] ≤ 0``; ``tau [n]``,
    that of ``Σw = 1``; ``kkt_residual [n]`` and ``certified [n]`` (``kkt_residual ≤ tol``)."""

    w: Tensor
    chain_mu: Tensor
    tau: Tensor
    kkt_residual: Tensor
    certified: Tensor


def _segmented_cummin(x: Tensor, seg: Tensor) -> Tensor:
    """Running minimum of ``x [n, P]`` restarted where ``seg [n, P]`` (nondecreasing ids) changes, by ⌈log₂ P⌉
    doubling steps (Hillis–Steele: after the step of offset ``s`` each entry holds the minimum of its last ``2s``)."""
    n, P = x.shape
    s = 1
    while s < P:
        prev = torch.cat([x.new_full((n, s), torch.inf), x[:, :-s]], dim=-1)
        same = torch.cat([torch.zeros_like(seg[:, :s], dtype=torch.bool), seg[:, s:] == seg[:, :-s]], dim=-1)
        x = torch.where(same, torch.minimum(x, prev), x)
        s *= 2
    return x


def _running_bound(inc: Tensor, cont: Tensor) -> Tensor:
    """``R_p = max(0, R_{p−1} + inc_p)`` where ``cont_p``, else ``R_p = 0`` (``R_{−1} = 0``), for ``inc, cont [n, P]``:
    ``R_p = S_p − min_{r ≤ j ≤ p} S_j`` with ``S`` the cumulative sum and ``r`` the last restart (before the first
    restart the minimum also takes ``S_{−1} = 0``)."""
    S = inc.cumsum(-1)
    seg = (~cont).long().cumsum(-1)
    floor = torch.where(seg == 0, 0.0, torch.inf).to(S.dtype)
    return S - torch.minimum(_segmented_cummin(S, seg), floor)


def _chain_multipliers(d: Tensor, at_lo: Tensor, at_hi: Tensor, open_: Tensor) -> Tensor:
    """The least ``μ [n, K−1] ≥ 0`` with ``μ_k ≥ μ_{k−1} + d_k`` off the lower bound, ``μ_k ≥ μ_{k+1} − d_{k+1}``
    off the upper bound, and ``μ_k = 0`` where ``open_`` is false (chain order, module docstring)."""
    fwd = _running_bound(d[:, :-1], open_ & ~at_lo[:, :-1])
    bwd = _running_bound((-d[:, 1:]).flip(-1), (open_ & ~at_hi[:, 1:]).flip(-1)).flip(-1)
    return torch.where(open_, torch.maximum(fwd, bwd), 0.0)


def _kkt_residual(y: Tensor, lo: Tensor, hi: Tensor, links: Tensor, x: Tensor, tau: Tensor, mu: Tensor) -> Tensor:
    """Full KKT residual ``[n]`` of ``x`` with the multipliers ``(τ, μ)`` (chain order, module docstring)."""
    pad = mu.new_zeros(mu.shape[0], 1)
    mu_ext = torch.cat([pad, mu, pad], dim=-1)
    u = y - tau[:, None] - mu_ext[:, :-1] + mu_ext[:, 1:]
    scale = y.abs().amax(-1, keepdim=True).clamp_min(1.0)
    gap = x[:, :-1] - x[:, 1:]
    parts = [
        (x.sum(-1, keepdim=True) - 1).abs(),
        (lo - x).clamp_min(0), (x - hi).clamp_min(0),
        torch.where(links, (-gap).clamp_min(0), 0.0),
        torch.where(links, torch.minimum(mu, gap).abs(), 0.0),
        (x - u.clamp(lo, hi)).abs() / scale,
    ]
    return torch.cat(parts, dim=-1).amax(-1)


def _certificate(y: Tensor, lo: Tensor, hi: Tensor, links: Tensor, x: Tensor, tau: Tensor, at_lo: Tensor,
                 at_hi: Tensor, open_: Tensor) -> tuple[Tensor, Tensor]:
    """``(μ, KKT residual)`` of ``x`` at ``τ`` (chain order): the least chain multipliers and the full residual."""
    mu = _chain_multipliers(x - y + tau[:, None], at_lo, at_hi, open_)
    return mu, _kkt_residual(y, lo, hi, links, x, tau, mu)


def _tau_at_bounds(y: Tensor, x: Tensor, at_lo: Tensor, at_hi: Tensor, tau: Tensor) -> Tensor:
    """A second ``τ`` to certify ``x`` with, for rows where every coordinate is at a bound (``τ`` then lies in an
    interval and the candidate's may admit no μ): the midpoint of ``[max (v − x), min (v − x)]``, the max over the
    coordinates only at their lower bound and the min over those only at their upper one (``v − τ`` below / above
    ``x`` there), or its one finite end; the candidate's ``τ`` elsewhere."""
    r = y - x
    low = torch.where(at_lo & ~at_hi, r, -torch.inf).amax(-1)
    high = torch.where(at_hi & ~at_lo, r, torch.inf).amin(-1)
    alt = torch.where(low > -torch.inf, torch.where(high < torch.inf, 0.5 * (low + high), low), high)
    return torch.where((at_lo | at_hi).all(-1) & alt.isfinite(), alt, tau)


def project_chain_box(v: Tensor, lo: Tensor, hi: Tensor, perm: Tensor, links: Tensor, *, tol: float) -> ChainBoxResult:
    """Projection of ``v [n, K]`` onto ``{Σw = 1, lo ≤ w ≤ hi, w[π_k] ≥ w[π_{k+1}] where links[k]}`` (``lo, hi
    [n, K]``, ``perm [n, K]`` long, ``links [n, K−1]`` bool) by a fixed sequence of batched tensor ops (no host
    synchronisation; compiles with ``torch.compile(fullgraph=True)``), in ``v.dtype``. Every row carries its KKT
    certificate (module docstring; at the better of the candidate's ``τ`` and :func:`_tau_at_bounds`); uncertified
    rows must be solved by an exact general path."""
    y, l, h = (t.gather(-1, perm) for t in (v, lo, hi))
    iso = isotonic_decreasing(y, links)[0]
    x, z = _euclid_box_simplex_u(iso, l, h)  # x = clamp(z, l, h), z = iso − τ
    at_lo, at_hi = x <= l + tol, x >= h - tol
    open_ = links & (x[:, :-1] - x[:, 1:] <= tol)  # linked and tight: the only pairs whose multiplier may be > 0
    tau = iso[:, 0] - z[:, 0]
    mu, kkt = _certificate(y, l, h, links, x, tau, at_lo, at_hi, open_)
    tau_b = _tau_at_bounds(y, x, at_lo, at_hi, tau)
    mu_b, kkt_b = _certificate(y, l, h, links, x, tau_b, at_lo, at_hi, open_)
    better = kkt_b < kkt
    tau, kkt = torch.where(better, tau_b, tau), torch.where(better, kkt_b, kkt)
    mu = torch.where(better[:, None], mu_b, mu)
    w = torch.empty_like(x).scatter_(-1, perm, x)
    return ChainBoxResult(w, mu, tau, kkt, kkt <= tol)
