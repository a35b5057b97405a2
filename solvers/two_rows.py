"""Fixed-shape, sync-free projection onto box∩simplex ∩ {a₁·w ≤ b₁} ∩ {a₂·w ≤ b₂}, with a KKT certificate per row.

``P(v) = argmin ½‖w − v‖²`` over ``{lo ≤ w ≤ hi, Σw = 1, a₁·w ≤ b₁, a₂·w ≤ b₂}`` is
``w = clamp(v − τ − μ₁a₁ − μ₂a₂, lo, hi)`` with ``μ ≥ 0`` and ``μⱼ (aⱼ·w − bⱼ) = 0``. Three stages, each a fixed
number of batched tensor ops (no sort, no data-dependent control flow, no host synchronisation):

1. the one-row kernel :func:`~solvers.parametric.project_box_halfspace` on each row alone (both in one call); a
   certified candidate that also satisfies the other row (``a·w ≤ b + tol``) is the answer (other ``μ = 0``);
2. semismooth Newton on ``(τ, μ₁, μ₂)`` from the candidate whose other row is violated least: on the free set
   ``F`` (``w = u``) ``(Σw − 1, a₁·w − b₁, a₂·w − b₂)`` moves by ``−J Δ``, ``J = Σ_F e eᵀ``, ``e = (1, a₁, a₂)``;
   row ``j`` binds where ``μⱼ > 0`` or ``gⱼ > 0``, else ``Δμⱼ = −μⱼ`` (its row and column of ``J`` replaced by the
   identity); the symmetric 3×3 systems are solved by cofactors (a relative ridge on the ``μ`` diagonal keeps
   parallel rows finite; a non-finite step is no step); the iterate of least KKT residual is kept;
3. the certificate: ``w = clamp(v − τ − μ·A)`` at the reported multipliers (stationarity by construction) and
   ``max(|Σw − 1|, maxⱼ max(gⱼ, 0), maxⱼ |min(μⱼ, −gⱼ)|) ≤ tol`` with ``μ ≥ 0``, so a wrong point never passes.
   Rows not certified (an empty set, many partition changes) are left to the caller's exact general path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from solvers.parametric import FixedShapeResult, _sums, project_box_halfspace

__all__ = ["project_box_two_halfspaces"]

_COLUMNS_MAX_K = 8  # up to this K the Newton stage works on [K, n] (a reduction over K adds K contiguous rows)
# (newton_steps, path_steps, newton_polish) of the one-row kernel by K (as solvers.projection's _FIXED_STEPS)
_KERNEL_STEPS = ((4, (3, 4, 0)), (8, (3, 5, 2)), (16, (3, 0, 8)), (math.inf, (3, 0, 10)))
_RIDGE = 1e-12  # relative ridge on the μ diagonal of J (parallel rows: J singular in the μ plane)


def _workspace(v: Tensor, a1: Tensor, a2: Tensor) -> Tensor:
    """``[16, *v.shape]`` (one allocation for every full-size intermediate of the Newton stage): slots ``0…8`` the
    stacked quantities summed together (``w, a₁w, a₂w, F, F·(a₁, a₂, a₁², a₁a₂, a₂²)``), ``9`` ``u``, ``10`` the
    kept iterate, ``11…15`` ``a₁, a₂, a₁², a₁a₂, a₂²`` (the free set's moments in one product)."""
    ws = v.new_empty(16, *v.shape)
    ws[11].copy_(a1)
    ws[12].copy_(a2)
    torch.mul(a1, a1, out=ws[13])
    torch.mul(a1, a2, out=ws[14])
    torch.mul(a2, a2, out=ws[15])
    return ws


def _solve3(j: tuple[Tensor, ...], r: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """``Δ`` with ``J Δ = r`` for the symmetric ``J`` given by its entries ``(j00, j01, j02, j11, j12, j22)`` (per
    row), by cofactors; a singular or non-finite solve gives the zero step."""
    j00, j01, j02, j11, j12, j22 = j
    c00, c01, c02 = j11 * j22 - j12 * j12, j02 * j12 - j01 * j22, j01 * j12 - j02 * j11
    c11, c12, c22 = j00 * j22 - j02 * j02, j01 * j02 - j00 * j12, j00 * j11 - j01 * j01
    det = j00 * c00 + j01 * c01 + j02 * c02
    inv = torch.where(det != 0, 1.0 / torch.where(det != 0, det, 1.0), 0.0)
    r0, r1, r2 = r
    x = ((c00 * r0 + c01 * r1 + c02 * r2) * inv, (c01 * r0 + c11 * r1 + c12 * r2) * inv,
         (c02 * r0 + c12 * r1 + c22 * r2) * inv)
    ok = torch.isfinite(x[0]) & torch.isfinite(x[1]) & torch.isfinite(x[2])
    return tuple(torch.where(ok, t, 0.0) for t in x)  # type: ignore[return-value]


def _iterate(v: Tensor, lo: Tensor, hi: Tensor, b1: Tensor, b2: Tensor, tau: Tensor, mu1: Tensor, mu2: Tensor,
             ws: Tensor, ax: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """At ``(τ, μ₁, μ₂)`` (one per row, size 1 along ``ax``): ``w = clamp(v − τ − μ₁a₁ − μ₂a₂, lo, hi)`` (slot 0), its
    KKT residual, and the next semismooth Newton iterate (module doc). Returns ``(kkt, τ', μ₁', μ₂')``."""
    w, u, F = ws[0], ws[9], ws[3]
    torch.sub(v, tau, out=u).addcmul_(ws[11], mu1, value=-1.0).addcmul_(ws[12], mu2, value=-1.0)
    torch.clamp(u, lo, hi, out=w)
    torch.mul(ws[11:13], w, out=ws[1:3])
    torch.eq(w, u, out=F)
    torch.mul(ws[11:16], F, out=ws[4:9])
    sw, sw1, sw2, n, s1, s2, s11, s12, s22 = _sums(ws[:9], ax).unbind(0)
    r, g1, g2 = sw - 1, sw1 - b1, sw2 - b2
    kkt = torch.maximum(torch.maximum(r.abs(), torch.maximum(g1.clamp_min(0), g2.clamp_min(0))),
                        torch.maximum(torch.minimum(mu1, -g1).abs(), torch.minimum(mu2, -g2).abs()))
    some = n > 0
    act1, act2 = ((mu1 > 0) | (g1 > 0)) & some, ((mu2 > 0) | (g2 > 0)) & some
    # an inactive row: Δμ fixed (−μ, or 0 where the row is violated but nothing is free), moved to the right side
    d1 = torch.where(act1, 0.0, torch.where(g1 > 0, 0.0, -mu1))
    d2 = torch.where(act2, 0.0, torch.where(g2 > 0, 0.0, -mu2))
    one, zero = torch.ones_like(n), torch.zeros_like(n)
    j00 = torch.where(some, n, one)  # nothing free: Δτ = r (the slope-1 guess of the one-row kernel)
    j01, j02 = torch.where(act1, s1, zero), torch.where(act2, s2, zero)
    j11 = torch.where(act1, s11 * (1 + _RIDGE) + _RIDGE * n, one)
    j22 = torch.where(act2, s22 * (1 + _RIDGE) + _RIDGE * n, one)
    j12 = torch.where(act1 & act2, s12, zero)
    rhs0 = r - s1 * d1 - s2 * d2
    rhs1 = torch.where(act1, g1 - s12 * d2, d1)
    rhs2 = torch.where(act2, g2 - s12 * d1, d2)
    dtau, dmu1, dmu2 = _solve3((j00, j01, j02, j11, j12, j22), (rhs0, rhs1, rhs2))
    return kkt, tau + dtau, (mu1 + dmu1).clamp_min(0), (mu2 + dmu2).clamp_min(0)


def _tau_of(v: Tensor, lo: Tensor, hi: Tensor, w: Tensor, mu1: Tensor, mu2: Tensor, a1: Tensor, a2: Tensor,
            ax: int) -> Tensor:
    """``τ`` of a candidate ``w = clamp(v − τ − μ₁a₁ − μ₂a₂, lo, hi)``: the mean of ``c = v − μ·a − w`` over the free
    coordinates (``c = τ`` there); where nothing is free, the least ``τ`` keeping the coordinates at ``lo`` there
    (``max_L c``: one of them becomes free), or the largest keeping those at ``hi`` (``min_U c``)."""
    c = v - w - mu1 * a1 - mu2 * a2
    at_lo, at_hi = w <= lo, w >= hi
    free = ~(at_lo | at_hi)
    n = free.sum(ax, keepdim=True)
    mean = torch.where(free, c, 0.0).sum(ax, keepdim=True) / n.clamp_min(1)
    low_end = torch.where(at_lo, c, -math.inf).amax(ax, keepdim=True)
    high_end = torch.where(at_hi, c, math.inf).amin(ax, keepdim=True)
    vertex = torch.where(torch.isfinite(low_end), low_end, high_end)
    return torch.where(n > 0, mean, torch.where(torch.isfinite(vertex), vertex, 0.0))


def project_box_two_halfspaces(v: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, *, tol: float,
                               steps: int = 8, kernel_steps: tuple[int, int, int] | None = None) -> FixedShapeResult:
    """Projection of ``v [n, K]`` onto ``{lo ≤ w ≤ hi, Σw = 1, A w ≤ b}`` with two rows (``lo, hi [n, K]``,
    ``A [n, 2, K]``, ``b [n, 2]``) by a fixed sequence of batched tensor ops (module doc): the one-row kernel on each
    row (``kernel_steps`` = its ``(newton_steps, path_steps, newton_polish)``, by default those
    :func:`solvers.project` uses for ``K``), then ``steps`` semismooth Newton steps on ``(τ, μ₁, μ₂)``. Computes in
    ``v.dtype`` (use float64); compiles with ``torch.compile(fullgraph=True)``.

    Returns a :class:`~solvers.parametric.FixedShapeResult` whose ``mu`` is ``[n, 2]`` (both rows' multipliers),
    ``kkt_residual [n]``, ``certified [n]`` (KKT residual ≤ ``tol``; uncertified rows need an exact fallback) and
    ``path_steps [n]``: the one-row kernel's path steps on the row(s) used plus the Newton steps taken on the two-row
    system (0 where a one-row candidate is the answer).
    """
    n_rows, K = v.shape
    if kernel_steps is None:
        kernel_steps = next(st for k_max, st in _KERNEL_STEPS if K <= k_max)
    a1, a2, b1, b2 = A[:, 0], A[:, 1], b[:, 0], b[:, 1]
    # stage 1: each row alone, both in one call of the one-row kernel
    one = project_box_halfspace(torch.cat([v, v]), torch.cat([lo, lo]), torch.cat([hi, hi]), torch.cat([a1, a2]),
                                torch.cat([b1, b2]), tol=tol, newton_steps=kernel_steps[0],
                                path_steps=kernel_steps[1], newton_polish=kernel_steps[2])
    w_1, w_2 = one.w[:n_rows], one.w[n_rows:]
    mu_1, mu_2 = one.mu[:n_rows], one.mu[n_rows:]
    g_12 = (a2 * w_1).sum(-1) - b2  # the other row at each candidate
    g_21 = (a1 * w_2).sum(-1) - b1
    kkt_1 = torch.maximum(one.kkt_residual[:n_rows], g_12.clamp_min(0))  # two-row KKT residuals (other μ = 0)
    kkt_2 = torch.maximum(one.kkt_residual[n_rows:], g_21.clamp_min(0))
    # stage 2: semismooth Newton on (τ, μ₁, μ₂) from the candidate whose other row is violated least
    first = g_12 <= g_21
    w0 = torch.where(first[:, None], w_1, w_2)
    m1, m2 = torch.where(first, mu_1, 0.0), torch.where(first, 0.0, mu_2)
    if K <= _COLUMNS_MAX_K:
        ax = 0
        vt, lot, hit, a1t, a2t, w0t = (t.T.contiguous() for t in (v, lo, hi, a1, a2, w0))
        b1t, b2t, m1, m2 = b1[None, :], b2[None, :], m1[None, :], m2[None, :]
    else:
        ax = -1
        vt, lot, hit, a1t, a2t, w0t = (t.contiguous() for t in (v, lo, hi, a1, a2, w0))
        b1t, b2t, m1, m2 = b1[:, None], b2[:, None], m1[:, None], m2[:, None]
    ws = _workspace(vt, a1t, a2t)
    tau = _tau_of(vt, lot, hit, w0t, m1, m2, a1t, a2t, ax)
    kkt, tau, m1n, m2n = _iterate(vt, lot, hit, b1t, b2t, tau, m1, m2, ws, ax)
    best_w = ws[10].copy_(ws[0])
    best_m1, best_m2 = m1, m2
    newton = torch.zeros_like(kkt, dtype=torch.long)
    for _ in range(steps):
        m1, m2 = m1n, m2n
        kkt_k, tau, m1n, m2n = _iterate(vt, lot, hit, b1t, b2t, tau, m1, m2, ws, ax)
        better = kkt_k < kkt
        best_w.add_(ws[0].sub_(best_w).mul_(better.to(v.dtype)))
        kkt = torch.where(better, kkt_k, kkt)
        best_m1, best_m2 = torch.where(better, m1, best_m1), torch.where(better, m2, best_m2)
        newton = newton + (kkt > tol).long()  # the steps taken while the kept point was not yet certified
    best_w = best_w.T if ax == 0 else best_w
    kkt, best_m1, best_m2, newton = (t.reshape(-1) for t in (kkt, best_m1, best_m2, newton))
    # stage 3: the least KKT residual of the three points (each a valid two-row certificate)
    take_1 = (kkt_1 <= kkt_2) & (kkt_1 <= kkt)
    take_2 = ~take_1 & (kkt_2 <= kkt)
    w = torch.where(take_1[:, None], w_1, torch.where(take_2[:, None], w_2, best_w))
    mu = torch.stack([torch.where(take_1, mu_1, torch.where(take_2, 0.0, best_m1)),
                      torch.where(take_1, 0.0, torch.where(take_2, mu_2, best_m2))], -1)
    res = torch.where(take_1, kkt_1, torch.where(take_2, kkt_2, kkt))
    path = torch.where(take_1, one.path_steps[:n_rows], torch.where(
        take_2, one.path_steps[n_rows:], torch.where(first, one.path_steps[:n_rows], one.path_steps[n_rows:]) + newton))
    return FixedShapeResult(w, mu, res, res <= tol, path)
