"""Fixed-shape, sync-free projection onto box∩simplex ∩ {a₁·w ≤ b₁} ∩ {a₂·w ≤ b₂}, with a KKT certificate per row.

``P(v) = argmin ½‖w − v‖²`` over ``{lo ≤ w ≤ hi, Σw = 1, a₁·w ≤ b₁, a₂·w ≤ b₂}`` is
``w = clamp(v − τ − μ₁a₁ − μ₂a₂, lo, hi)`` with ``μ ≥ 0`` and ``μⱼ (aⱼ·w − bⱼ) = 0``. Three stages, each a fixed
number of batched tensor ops (no sort, no data-dependent control flow, no host synchronisation):

1. the one-row kernel :func:`~solvers.parametric.project_box_halfspace` on each row alone (both in one call); a
   certified candidate that also satisfies the other row (``a·w ≤ b + tol``) is the answer (other ``μ = 0``);
2. semismooth Newton on ``(τ, μ₁, μ₂)`` from each candidate (two starts: ~99% of on-simplex rows where both
   rows bind are certified by one of them, ~95% from either alone; ``τ`` of a start recovered from its ``w``): on
   the free set ``F`` (``w = u``) ``(Σw − 1, a₁·w − b₁, a₂·w − b₂)`` moves by ``−J Δ``, ``J = Σ_F e eᵀ``,
   ``e = (1, a₁, a₂)``; row ``j`` binds where ``μⱼ > 0`` or ``gⱼ > 0``, else ``Δμⱼ = −μⱼ`` (its row and column of
   ``J`` replaced by the identity); the symmetric 3×3 systems are solved by cofactors (a relative ridge on the ``μ`` diagonal keeps
   parallel rows finite; a non-finite step is no step); where ``J`` is singular on ``F`` (fewer free coordinates
   than active rows) the bound coordinates enter it with weight ``δ`` (a damped step); each start keeps its
   iterate of least KKT residual;
3. the point of least KKT residual among the four; the certificate: ``w = clamp(v − τ − μ·A)`` at the reported
   multipliers (stationarity by construction) and ``max(|Σw − 1|, maxⱼ max(gⱼ, 0), maxⱼ |min(μⱼ, −gⱼ)|) ≤ tol``
   with ``μ ≥ 0``, so a wrong point never passes. Rows not certified (an empty set, many partition changes) are
   left to the caller's exact general path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from solvers.parametric import _COLUMNS_MAX_K, FixedShapeResult, _sums, project_box_halfspace

__all__ = ["project_box_two_halfspaces"]

# (newton_steps, path_steps, newton_polish) of the one-row kernel by K: path steps at every K (up to K = 8 the
# schedules solvers.projection's _FIXED_STEPS takes at K ≤ 7; above, path steps before Newton: measured, off-simplex
# rows where both rows are violated at w₀: certified 42% → 77% at K = 16, 34% → 66% at K = 32; on-simplex 100%
# either way; time about the same)
_KERNEL_STEPS = ((4, (3, 4, 0)), (8, (3, 5, 2)), (math.inf, (3, 4, 8)))
_RIDGE = 1e-12  # relative ridge on the μ diagonal of J (parallel rows: J singular in the μ plane)
_DELTA = 0.3  # the weight of the bound coordinates in J where J on the free set is singular


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
    ok = torch.isfinite(x[0] + x[1] + x[2])
    return tuple(torch.where(ok, t, 0.0) for t in x)  # type: ignore[return-value]


def _iterate(v: Tensor, lo: Tensor, hi: Tensor, b1: Tensor, b2: Tensor, tau: Tensor, mu1: Tensor, mu2: Tensor,
             ws: Tensor, ax: int, totals: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """At ``(τ, μ₁, μ₂)`` (one per row, size 1 along ``ax``): ``w = clamp(v − τ − μ₁a₁ − μ₂a₂, lo, hi)`` (slot 0), its
    KKT residual, and the next semismooth Newton iterate (module doc; ``totals``: the entries of ``J`` over all
    coordinates). Returns ``(kkt, τ', μ₁', μ₂')``."""
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
    act1, act2 = (mu1 > 0) | (g1 > 0), (mu2 > 0) | (g2 > 0)
    # J on the free set; where it is singular for lack of free coordinates (|F| < 1 + active rows) the bound ones
    # join it with weight δ (a damped step toward freeing them, always finite; measured: as many rows certified as
    # with a determinant test, which costs ~25 more ops a step; rows affinely dependent on F are left to the ridge)
    j = (n, s1, s2, s11, s12, s22)
    singular = n < 1 + act1.to(n.dtype) + act2.to(n.dtype)
    j = tuple(torch.where(singular, x + _DELTA * (t - x), x) for x, t in zip(j, totals))
    n, s1, s2, s11, s12, s22 = j
    # an inactive row: Δμ fixed (−μ), moved to the right side; its row and column of J replaced by the identity
    d1, d2 = torch.where(act1, 0.0, -mu1), torch.where(act2, 0.0, -mu2)
    one, zero = torch.ones_like(n), torch.zeros_like(n)
    j00 = n
    j01, j02 = torch.where(act1, s1, zero), torch.where(act2, s2, zero)
    j11 = torch.where(act1, s11 * (1 + _RIDGE), one)
    j22 = torch.where(act2, s22 * (1 + _RIDGE), one)
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
    row (``kernel_steps`` = its ``(newton_steps, path_steps, newton_polish)``, by default ``_KERNEL_STEPS`` for
    ``K``), then ``steps`` semismooth Newton steps on ``(τ, μ₁, μ₂)``. Computes in
    ``v.dtype`` (use float64); compiles with ``torch.compile(fullgraph=True)``.

    Returns a :class:`~solvers.parametric.FixedShapeResult` whose ``mu`` is ``[n, 2]`` (both rows' multipliers),
    ``kkt_residual [n]``, ``certified [n]`` (KKT residual ≤ ``tol``; uncertified rows need an exact fallback) and
    ``iterations [n]``: the one-row kernel's iterations on the row whose candidate is the answer or started the
    Newton iterate kept, plus (for a Newton point) the Newton steps taken while that start was not yet certified.
    """
    n_rows, K = v.shape
    if kernel_steps is None:
        kernel_steps = next(st for k_max, st in _KERNEL_STEPS if K <= k_max)
    a1, a2, b1, b2 = A[:, 0], A[:, 1], b[:, 0], b[:, 1]
    # stage 1: each row alone, both in one call of the one-row kernel
    vv, ll, hh = torch.cat([v, v]), torch.cat([lo, lo]), torch.cat([hi, hi])
    one = project_box_halfspace(vv, ll, hh, torch.cat([a1, a2]), torch.cat([b1, b2]), tol=tol,
                                newton_steps=kernel_steps[0], path_steps=kernel_steps[1], newton_polish=kernel_steps[2])
    g_other = torch.cat([(a2 * one.w[:n_rows]).sum(-1) - b2, (a1 * one.w[n_rows:]).sum(-1) - b1])
    kkt_one = torch.maximum(one.kkt_residual, g_other.clamp_min(0))  # two-row KKT residuals (the other μ = 0)
    zero = torch.zeros_like(one.mu[:n_rows])
    m1, m2 = torch.cat([one.mu[:n_rows], zero]), torch.cat([zero, one.mu[n_rows:]])
    # stage 2: semismooth Newton on (τ, μ₁, μ₂) from each candidate (2n rows: the first n start from row 1's)
    if K <= _COLUMNS_MAX_K:
        ax = 0
        vt, lot, hit, a1t, a2t, w0t = (t.T.contiguous() for t in (vv, ll, hh, torch.cat([a1, a1]), torch.cat([a2, a2]),
                                                                   one.w))
        b1t, b2t, m1, m2 = torch.cat([b1, b1])[None, :], torch.cat([b2, b2])[None, :], m1[None, :], m2[None, :]
    else:
        ax = -1
        vt, lot, hit, a1t, a2t, w0t = vv, ll, hh, torch.cat([a1, a1]), torch.cat([a2, a2]), one.w.contiguous()
        b1t, b2t, m1, m2 = torch.cat([b1, b1])[:, None], torch.cat([b2, b2])[:, None], m1[:, None], m2[:, None]
    ws = _workspace(vt, a1t, a2t)
    totals = (torch.full_like(b1t, K), *_sums(ws[11:16], ax).unbind(0))
    tau = _tau_of(vt, lot, hit, w0t, m1, m2, a1t, a2t, ax)
    kkt, tau, m1n, m2n = _iterate(vt, lot, hit, b1t, b2t, tau, m1, m2, ws, ax, totals)
    best_w = ws[10].copy_(ws[0])
    best_m1, best_m2 = m1, m2
    newton = torch.zeros_like(kkt, dtype=torch.long)
    for _ in range(steps):
        m1, m2 = m1n, m2n
        kkt_k, tau, m1n, m2n = _iterate(vt, lot, hit, b1t, b2t, tau, m1, m2, ws, ax, totals)
        better = kkt_k < kkt
        best_w.add_(ws[0].sub_(best_w).mul_(better.to(v.dtype)))
        kkt = torch.where(better, kkt_k, kkt)
        best_m1, best_m2 = torch.where(better, m1, best_m1), torch.where(better, m2, best_m2)
        newton = newton + (kkt > tol).long()  # the steps taken while the kept point was not yet certified
    best_w = best_w.T if ax == 0 else best_w
    # stage 3: the point of least KKT residual among the two candidates and the two Newton points (each residual is
    # a valid two-row certificate of its point)
    kkts = torch.stack([kkt_one, kkt.reshape(-1)]).reshape(4, n_rows)  # cand 1, cand 2, Newton from 1, from 2
    best01, best23 = torch.minimum(kkts[0], kkts[1]), torch.minimum(kkts[2], kkts[3])
    pick = torch.where(best01 <= best23, torch.where(kkts[0] <= kkts[1], 0, 1), torch.where(kkts[2] <= kkts[3], 2, 3))
    ws_pts = torch.stack([one.w, best_w]).reshape(4, n_rows, K)
    w = ws_pts.gather(0, pick[None, :, None].expand(1, n_rows, K))[0]
    mus = torch.stack([torch.stack([torch.cat([one.mu[:n_rows], zero]), torch.cat([zero, one.mu[n_rows:]])], -1),
                       torch.stack([best_m1.reshape(-1), best_m2.reshape(-1)], -1)]).reshape(4, n_rows, 2)
    mu = mus.gather(0, pick[None, :, None].expand(1, n_rows, 2))[0]
    res = torch.minimum(best01, best23)
    paths = torch.cat([one.iterations, one.iterations + newton.reshape(-1)]).reshape(4, n_rows)
    return FixedShapeResult(w, mu, res, res <= tol, paths.gather(0, pick[None])[0])
