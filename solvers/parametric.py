"""Fixed-shape, sync-free projection onto box∩simplex ∩ {a·w ≤ b} (one row), with a KKT certificate per row.

``P(v) = argmin ½‖w − v‖²`` over ``{lo ≤ w ≤ hi, Σw = 1, a·w ≤ b}`` is ``w = clamp(v − τ − μa, lo, hi)`` with
``μ ≥ 0`` the row's multiplier and ``τ`` that of ``Σw = 1``. Two stages, each a fixed number of batched
elementwise steps (no sort, no data-dependent control flow, no host synchronisation):

1. ``τ₀`` at ``μ = 0`` (the box∩simplex projection): Newton on the nonincreasing piecewise-linear
   ``f(τ) = Σ clamp(v − τ, lo, hi) − 1`` with the one-sided slope ``−|F|`` (``F`` = coordinates free on the side
   the step goes), a breakpoint step where nothing is free, and a false-position step inside the bracket
   ``[min(v − hi), max(v − lo)]`` where Newton leaves it.
2. the parametric path ``μ ↦ (τ(μ), w(μ))`` from 0 (rows violating the row at ``w₀``): on a fixed partition
   (free ``F``, lower ``L``, upper ``U``) ``dτ/dμ = −ā_F`` and ``du/dμ = −(a − ā_F)`` for ``u = v − τ − μa``, so
   ``g(μ) = a·w − b`` falls with slope ``−Σ_F (a − ā_F)²``; each step goes to the root of ``g`` or to the first
   coordinate that changes side, whichever comes first (exact, monotone in ``μ``), for a fixed number of steps;
   then semismooth Newton steps on ``(τ, μ)`` jump over the remaining partition changes.

The last partition fixes ``(τ, μ)`` by a 2×2 linear solve (exact on the root's piece), and the point is
certified by the full KKT conditions: ``w = clamp(v − τ − μa)`` (stationarity, by construction), ``|Σw − 1|``,
``max(g, 0)`` and ``|min(μ, −g)|`` at most ``tol``, ``μ ≥ 0``. Rows not certified in the fixed number of steps
(many partition changes, an empty set, degenerate ties) are left to the caller's exact fallback
(:func:`solvers.project` runs its active set on them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FixedShapeResult", "project_box_halfspace"]


@dataclass(frozen=True)
class FixedShapeResult:
    """``w [n, K]``, the row multiplier ``mu [n]`` (0 without a row), the KKT residual ``kkt_residual [n]``,
    ``certified [n]`` (``kkt_residual ≤ tol``) and ``path_steps [n]`` (partition changes taken in stage 2)."""

    w: Tensor
    mu: Tensor
    kkt_residual: Tensor
    certified: Tensor
    path_steps: Tensor


def _newton_tau(v: Tensor, lo: Tensor, hi: Tensor, steps: int) -> Tensor:
    """``τ`` with ``Σ clamp(v − τ, lo, hi) = 1`` after ``steps`` safeguarded Newton steps (see the module doc)."""
    t_lo, f_lo = (v - hi).amin(-1), hi.sum(-1) - 1  # f(t_lo) = Σhi − 1 ≥ 0 ≥ Σlo − 1 = f(t_hi)
    t_hi, f_hi = (v - lo).amax(-1), lo.sum(-1) - 1
    tau = (v.sum(-1) - 1) / v.shape[-1]
    for _ in range(steps):
        u = v - tau[:, None]
        f = u.clamp(lo, hi).sum(-1) - 1
        up = f > 0  # too much mass: τ increases; coordinates at hi free first, those at lo stay
        t_lo, f_lo = torch.where(up, tau, t_lo), torch.where(up, f, f_lo)
        t_hi, f_hi = torch.where(up, t_hi, tau), torch.where(up, f_hi, f)
        free = torch.where(up[:, None], (u > lo) & (u <= hi), (u >= lo) & (u < hi))
        n = free.sum(-1)
        gap = torch.where(up[:, None], torch.where(u > hi, u - hi, math.inf), torch.where(u < lo, u - lo, -math.inf))
        newton = torch.where(n > 0, tau + f / n.clamp_min(1), tau + torch.where(up, gap.amin(-1), gap.amax(-1)))
        falsi = t_lo + f_lo * (t_hi - t_lo) / torch.where(f_lo > f_hi, f_lo - f_hi, 1.0)
        inside = (newton >= t_lo) & (newton <= t_hi)
        tau = torch.where(f == 0, tau, torch.where(inside, newton, falsi))
    return tau


def _exact_on_partition(v: Tensor, lo: Tensor, hi: Tensor, a: Tensor, b: Tensor, free: Tensor, low: Tensor,
                        upp: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """``(τ, μ)`` solving ``Σw = 1`` (and ``a·w = b`` where ``active``) with ``w_F = v_F − τ − μa_F``, ``w_L = lo``,
    ``w_U = hi``: a 2×2 system ``[[|F|, Σ_F a], [Σ_F a, Σ_F a²]] (τ, μ) = (p, q)`` (``μ = 0`` where inactive)."""
    F = free.to(v.dtype)
    fixed = torch.where(low, lo, 0.0) + torch.where(upp, hi, 0.0)
    n, sa, saa = F.sum(-1), (F * a).sum(-1), (F * a * a).sum(-1)
    p = (F * v).sum(-1) + fixed.sum(-1) - 1
    q = (F * a * v).sum(-1) + (a * fixed).sum(-1) - b
    det = n * saa - sa * sa
    solvable = active & (det > 1e-14 * n * saa)
    safe = torch.where(solvable, det, 1.0)
    tau = torch.where(solvable, (saa * p - sa * q) / safe, p / n.clamp_min(1))
    mu = torch.where(solvable, (n * q - sa * p) / safe, 0.0)
    return tau, mu


def project_box_halfspace(v: Tensor, lo: Tensor, hi: Tensor, a: Tensor | None = None, b: Tensor | None = None, *,
                          tol: float, newton_steps: int = 6, path_steps: int = 4,
                          newton_polish: int = 3) -> FixedShapeResult:
    """Projection of ``v [n, K]`` onto ``{lo ≤ w ≤ hi, Σw = 1, a·w ≤ b}`` (``a [n, K]``, ``b [n]``; ``a = None``:
    box∩simplex only) by a fixed sequence of batched tensor ops: ``newton_steps`` for ``τ₀``, ``path_steps``
    along the path in ``μ``, then the exact finish on the last partition and ``newton_polish`` semismooth Newton
    steps on ``(τ, μ)`` (partition of ``u``, 2×2 solve; the certified candidate with the least residual is kept,
    the path's first). Computes in ``v.dtype``; compiles with
    ``torch.compile(fullgraph=True)`` (no graph break, no host synchronisation). Every row carries its
    certificate (``certified``: KKT residual ≤ ``tol``); uncertified rows must be solved by an exact fallback.
    """
    n_rows, K = v.shape
    tau = _newton_tau(v, lo, hi, newton_steps)
    u = v - tau[:, None]
    low, upp = u <= lo, u >= hi  # ties count as bound: the partition of the exact finish
    free = ~(low | upp)
    zero = v.new_zeros(n_rows)
    if a is None or b is None:
        a, b = v.new_zeros(n_rows, K), v.new_ones(n_rows)
    tau, _ = _exact_on_partition(v, lo, hi, a, b, free, low, upp, torch.zeros_like(free[:, 0]))
    u = v - tau[:, None]
    g = (a * u.clamp(lo, hi)).sum(-1) - b
    done = g <= 0
    mu, steps = zero, torch.zeros(n_rows, dtype=torch.long, device=v.device)
    for _ in range(path_steps):
        F = free.to(v.dtype)
        abar = (F * a).sum(-1) / F.sum(-1).clamp_min(1)
        d = abar[:, None] - a  # du/dμ on this partition
        slope = (F * a * d).sum(-1)  # dg/dμ = −Σ_F (a − ā)² ≤ 0
        to_root = torch.where(slope < 0, g / -torch.where(slope < 0, slope, -1.0), math.inf)
        target = torch.where(d > 0, torch.where(low, lo, hi), torch.where(upp, hi, lo))
        moves = (d != 0) & ~(low & (d < 0)) & ~(upp & (d > 0))
        event = torch.where(moves, (target - u) / torch.where(moves, d, 1.0), math.inf).clamp_min(0)
        first = event.amin(-1)
        step = torch.where(done, 0.0, torch.minimum(to_root, first))
        mu, tau, u = mu + step, tau - step * abar, u + step[:, None] * d
        hit = (event <= first[:, None]) & ~(done | (to_root <= first))[:, None]
        low, upp, free = torch.where(hit, free & (d < 0), low), torch.where(hit, free & (d > 0), upp), free ^ hit
        g = g + step * slope
        steps = steps + (~done).long()
        done = done | (to_root <= first)
    best = None
    for k in range(newton_polish + 1):  # the exact finish on the last partition, then Newton steps (partition of u)
        if k:
            u = v - tau[:, None] - mu[:, None] * a
            low, upp = u <= lo, u >= hi
            free = ~(low | upp)
        act = mu > 0
        tau_x, mu_x = _exact_on_partition(v, lo, hi, a, b, free, low, upp, act)
        tau, mu = torch.where(act, tau_x, tau), torch.where(act, mu_x, mu).clamp_min(0)
        w = (v - tau[:, None] - mu[:, None] * a).clamp(lo, hi)
        g = (a * w).sum(-1) - b
        kkt = torch.maximum(torch.maximum((w.sum(-1) - 1).abs(), g.clamp_min(0)), torch.minimum(mu, -g).abs())
        if best is None:
            best = (w, mu, kkt)
        else:
            keep = best[2] <= kkt
            best = tuple(torch.where(keep[:, None] if t.dim() == 2 else keep, t, s) for t, s in zip(best, (w, mu, kkt)))
    w, mu, kkt = best
    return FixedShapeResult(w, mu, kkt, kkt <= tol, steps)
