"""Fixed-shape, sync-free projection onto box ∩ simplex ∩ an ordinal chain, with a KKT certificate per row.

Per row: ``w = argmin ½‖w − v‖²`` s.t. ``Σw = 1``, ``lo ≤ w ≤ hi`` and the chain rows ``w[π_{k+1}] − w[π_k] ≤ 0``
for every linked pair (those of :meth:`~solvers.sets.FeasibleSet.order_by`; an unlinked pair splits the chain).

Candidate: ``w = clamp(iso(v) − τ, lo, hi)`` (``iso`` along π per linked segment, :mod:`solvers.isotonic`) with
``τ`` from the exact box∩simplex breakpoint search on ``iso(v)`` (``iso(y − τ) = iso(y) − τ``). It is the projection
wherever no bound cuts strictly inside a block of ``iso`` (e.g. bounds constant on each linked segment); bounds
nonincreasing along π do NOT suffice: ``v = (−0.9, 0.4, 0.1)``, ``lo = (0.6, 0, 0)`` gives ``(0.6, 0.2, 0.2)``, but
``P(v) = (0.6, 0.35, 0.05)``. So ``refine`` steps follow (default 3): ``w(τ) = P_{box∩chain}(v − τ)`` by the min–max
formula of isotonic regression with separable convex losses, ``x_i = min_{j≤i} max_{k≥i} clamp(mean(v_j..v_k) − τ,
L_j, H_k)`` (``L``, ``H``: the bound envelopes the chain implies), and safeguarded Newton on ``Σ w(τ) = 1`` from the
candidate's ``τ`` (exact once the block structure is right). Each step costs ``O(K²)`` per row, as ``iso`` does.

Certificate (chain order, ``d = w − v + τ``): stationarity ``w − v + τ1 + Σ_k μ_k (e_{π_{k+1}} − e_{π_k}) − ν⁻ + ν⁺
= 0`` reads ``μ_i − μ_{i−1} = d_i + ν⁺_i − ν⁻_i`` (``μ_{−1} = μ_{K−1} = 0``; ``ν⁺ ≥ 0`` only at an upper bound,
``ν⁻ ≥ 0`` only at a lower one) with ``μ_k = 0`` on pairs that are unlinked or not tight: difference constraints on
μ, whose least solution is the larger of two running bounds (off the lower bound ``μ_k ≥ μ_{k−1} + d_k``, off the
upper bound ``μ_k ≥ μ_{k+1} − d_{k+1}``, both ≥ 0: Lindley recursions in closed form). Then ``ν = u − clamp(u, lo,
hi)`` for ``u = v − τ − Σ_k μ_k (e_{π_{k+1}} − e_{π_k})``, and the KKT residual is the largest of ``|Σw − 1|``, the
box and chain violations, ``max(−μ_k, 0)`` (``|μ_k|`` on unlinked pairs), ``|min(μ_k, w[π_k] − w[π_{k+1}])|`` and
``‖w − clamp(u, lo, hi)‖∞`` (all absolute). ``(τ, μ ≥ 0, ν)`` are explicit multipliers: a certified row (residual
≤ ``tol``) meets every KKT condition of this convex problem to ``tol`` — it is the projection of data moved by
``O(tol)`` (``v`` by the stationarity error, bounds and rows by the primal and complementarity errors) — however the
candidate was found: a wrong candidate cannot be certified. Certification is
conservative: where ``τ`` is not unique (every coordinate at a bound) and the one picked admits no μ, or the
Newton steps did not reach the solution (or the set is empty), the row fails and belongs to an exact general path.

No host synchronisation: :func:`~solvers.isotonic.isotonic_decreasing` branches on shapes only (``K == 1``,
``n == 0``, its loop over row chunks of a size fixed by ``K``) and the rest is a fixed sequence of batched ops
(``refine`` works on unchunked ``[n, K, K]`` tensors: ``8·n·K²`` bytes each in float64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from solvers.isotonic import _run_ids, block_means, isotonic_decreasing
from solvers.parametric import _bracket_step, _euclid_box_simplex_u

__all__ = ["ChainBoxResult", "project_chain_box", "project_chain_box_halfspace"]


@dataclass(frozen=True)
class ChainBoxResult:
    """``w [n, K]``; ``chain_mu [n, K−1] ≥ 0``, the multipliers of the rows ``w[π_{k+1}] − w[π_k] ≤ 0``; ``tau [n]``,
    that of ``Σw = 1``; ``kkt_residual [n]`` and ``certified [n]`` (``kkt_residual ≤ tol``); with a row ``a·w ≤ b``
    (:func:`project_chain_box_halfspace`) its multiplier ``row_mu [n]`` and ``iterations [n]`` (the steps on it where
    the row binds), else None."""

    w: Tensor
    chain_mu: Tensor
    tau: Tensor
    kkt_residual: Tensor
    certified: Tensor
    row_mu: Tensor | None = None
    iterations: Tensor | None = None


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
    gap = x[:, :-1] - x[:, 1:]
    parts = [
        (x.sum(-1, keepdim=True) - 1).abs(),
        (lo - x).clamp_min(0), (x - hi).clamp_min(0),
        torch.where(links, (-gap).clamp_min(0), 0.0),
        (-mu).clamp_min(0) + torch.where(links, 0.0, mu.abs()),  # μ ≥ 0, and 0 on unlinked pairs
        torch.where(links, torch.minimum(mu, gap).abs(), 0.0),
        (x - u.clamp(lo, hi)).abs(),
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


def _bounded_iso_data(y: Tensor, lo: Tensor, hi: Tensor, links: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mean [n, K, K], valid [n, K, K], L, H)`` for :func:`_bounded_iso`, with the ``k`` axis reversed (its scan then
    runs forward): ``mean[j, K−1−k] = mean(y_j..y_k)``, valid for ``j ≤ k`` in one linked segment; the envelopes
    ``L_i = max_{m ≥ i} lo_m`` and ``H_i = min_{m ≤ i} hi_m`` (in the segment of ``i``: the bounds the chain implies,
    nonincreasing along it), ``H`` reversed."""
    n, K = y.shape
    seg = _run_ids(links)
    S = torch.cat([y.new_zeros(n, 1), y.cumsum(-1)], dim=-1).flip(-1)  # S[K − k] = Σ_{m<k} y_m
    idx = torch.arange(K, device=y.device)
    k = K - 1 - idx  # k of each reversed column
    mean = (S[:, None, :-1] - S[:, K - idx, None]) / (k[None, :] - idx[:, None] + 1).clamp_min(1).to(y.dtype)
    valid = (idx[:, None] <= k[None, :]) & (seg[:, :, None] == seg.flip(-1)[:, None, :])
    L = -_segmented_cummin((-lo).flip(-1), seg.flip(-1)).flip(-1)
    return mean, valid, L, _segmented_cummin(hi, seg).flip(-1)


def _bounded_iso(mean: Tensor, valid: Tensor, L: Tensor, H: Tensor, tau: Tensor) -> Tensor:
    """``argmin ½‖x − (y − τ)‖²`` over ``{lo ≤ x ≤ hi, x decreasing on linked pairs}`` (data of
    :func:`_bounded_iso_data`): the min–max formula of isotonic regression with separable convex losses,
    ``x_i = min_{j≤i} max_{k≥i} m_{jk}``, whose block minimisers are the clamped means ``m_{jk} =
    clamp(mean(y_j..y_k) − τ, L_j, H_k)`` (``L_j``, ``H_k``: the tightest envelopes on the block)."""
    t = tau[:, None]
    m = mean.clamp((L + t)[:, :, None], (H + t)[:, None, :])  # m_{jk} + τ: one pass over [n, K, K]
    tail = m.masked_fill_(~valid, -torch.inf).cummax(-1).values  # [j, K−1−i] = max_{k ≥ i} m_{jk} + τ
    return tail.masked_fill_(~valid, torch.inf).amin(-2).flip(-1) - t


def _refine(y: Tensor, lo: Tensor, hi: Tensor, links: Tensor, tau: Tensor, steps: int,
            tol: float) -> tuple[Tensor, Tensor]:
    """``(x, τ)``: ``steps`` safeguarded Newton steps on the nonincreasing ``f(τ) = Σ x(τ) − 1`` for ``x(τ)`` of
    :func:`_bounded_iso` (slope: minus the number of coordinates whose block is unclamped, ``x = mean(y over the
    block) − τ``; where nothing moves, ``τ`` goes to where the nearest clamped block's mean meets its value; Illinois
    false position inside the bracket ``[min y − 1, max y]`` (``x = H`` and ``x = L`` there) where Newton leaves
    it), then ``x`` at the last ``τ``: exact once the block structure is the solution's."""
    data = _bounded_iso_data(y, lo, hi, links)
    L, H = data[2], data[3]
    ends = torch.stack([y.amin(-1) - 1, y.amax(-1)])  # [t_lo, t_hi]: f(t_lo) ≥ 0 ≥ f(t_hi)
    values = torch.stack([H.sum(-1), L.sum(-1)]) - 1
    scale = y.abs().amax(-1, keepdim=True).clamp_min(1.0)
    moved = None
    for _ in range(steps):
        x = _bounded_iso(*data, tau)
        f = x.sum(-1) - 1
        up = f > 0  # too much mass: τ increases
        ends, values, moved, falsi = _bracket_step(ends, values, moved, tau, f, up)
        t_lo, t_hi = ends.unbind(0)
        meet = block_means(y, links & (x[:, :-1] == x[:, 1:])) - x  # the τ where each block's mean meets its value
        moving = ((meet - tau[:, None]).abs() <= tol * scale).to(y.dtype).sum(-1)
        newton = tau + f / moving.clamp_min(1)
        release = torch.where(up, torch.where(meet > tau[:, None], meet, torch.inf).amin(-1),
                              torch.where(meet < tau[:, None], meet, -torch.inf).amax(-1))  # nearest clamped block
        step = torch.where((release > t_lo) & (release < t_hi), release, falsi)
        tau = torch.where((moving > 0) & (newton >= t_lo) & (newton <= t_hi), newton, step)
    return _bounded_iso(*data, tau).clamp(lo, hi), tau


def project_chain_box(v: Tensor, lo: Tensor, hi: Tensor, perm: Tensor, links: Tensor, *, tol: float,
                      refine: int = 3) -> ChainBoxResult:
    """Projection of ``v [n, K]`` onto ``{Σw = 1, lo ≤ w ≤ hi, w[π_k] ≥ w[π_{k+1}] where links[k]}`` (``lo, hi
    [n, K]``, ``perm [n, K]`` long, ``links [n, K−1]`` bool) by a fixed sequence of batched tensor ops (no host
    synchronisation; compiles with ``torch.compile(fullgraph=True)``), in ``v.dtype``: the isotonic candidate, then
    ``refine`` Newton steps on the exact bounded isotonic regression (0: the candidate alone, 2–4× cheaper on CPU;
    exact where no bound cuts inside a block). Every row carries its KKT certificate (module docstring; at the better
    of the final ``τ`` and :func:`_tau_at_bounds`); uncertified rows must be solved by an exact general path."""
    y, l, h = (t.gather(-1, perm) for t in (v, lo, hi))
    iso = isotonic_decreasing(y, links)[0]
    x, z = _euclid_box_simplex_u(iso, l, h)  # x = clamp(z, l, h), z = iso − τ
    tau = iso[:, 0] - z[:, 0]
    if refine and v.shape[-1] > 1:  # (K = 1: the candidate is exact)
        x, tau = _refine(y, l, h, links, tau, refine, tol)
    at_lo, at_hi = x <= l + tol, x >= h - tol
    open_ = links & (x[:, :-1] - x[:, 1:] <= tol)  # linked and tight: the only pairs whose multiplier may be > 0
    mu, kkt = _certificate(y, l, h, links, x, tau, at_lo, at_hi, open_)
    tau_b = _tau_at_bounds(y, x, at_lo, at_hi, tau)
    mu_b, kkt_b = _certificate(y, l, h, links, x, tau_b, at_lo, at_hi, open_)
    better = kkt_b < kkt
    tau, kkt = torch.where(better, tau_b, tau), torch.where(better, kkt_b, kkt)
    mu = torch.where(better[:, None], mu_b, mu)
    w = torch.empty_like(x).scatter_(-1, perm, x)
    return ChainBoxResult(w, mu, tau, kkt, kkt <= tol)


def _row_curvature(x: Tensor, lo: Tensor, hi: Tensor, links: Tensor, a: Tensor, tol: float) -> Tensor:
    """``aᵀJa [n]`` with ``J`` the Jacobian of the chain∩box∩simplex projection at its solution ``x`` (chain order):
    the projector onto the vectors constant on each free block (tight linked runs with no coordinate at a bound), 0
    on the others, and summing to 0; so ``Σ_F ā² − (Σ_F ā)²/|F|`` with ``ā`` the block means of ``a`` and ``F`` the
    free blocks' coordinates. ``−aᵀJa`` is the slope of ``a·P(v − λa)`` in ``λ``."""
    same = links & (x[:, :-1] - x[:, 1:] <= tol)
    fixed = block_means(((x <= lo + tol) | (x >= hi - tol)).to(x.dtype), same) > 0
    free = (~fixed).to(x.dtype)
    a_bar = block_means(a, same)
    count = free.sum(-1)
    return (free * a_bar.square()).sum(-1) - (free * a_bar).sum(-1).square() / count.clamp_min(1)


def project_chain_box_halfspace(v: Tensor, lo: Tensor, hi: Tensor, perm: Tensor, links: Tensor, a: Tensor, b: Tensor,
                                *, tol: float, steps: int = 12, refine: int = 3) -> ChainBoxResult:
    """Projection of ``v [n, K]`` onto the set of :func:`project_chain_box` cut by one row ``a·w ≤ b`` (``a [n, K]``,
    ``b [n]``), by a fixed sequence of batched tensor ops (no host synchronisation; compiles with
    ``torch.compile(fullgraph=True)``): ``w = P(v − λa)`` with ``P`` the chain∩box∩simplex projection
    (:func:`project_chain_box`) and ``λ ≥ 0`` the root of the nonincreasing, piecewise linear ``φ(λ) = a·P(v − λa) −
    b``, by ``steps`` Newton steps (slope ``−aᵀJa``, :func:`_row_curvature`; exact once inside the root's linear
    piece) safeguarded by a bracket (Illinois false position inside it; before it closes, the larger of ``2λ`` and
    ``λ + φ/‖a − ā‖²``, a step that cannot pass the root: ``|φ'| ≤ ‖a − ā‖²``; a curvature below ``1e-9·‖a − ā‖²``
    counts as flat). Certificate: ``P``'s KKT residual at
    ``v − λa`` (its stationarity is the whole problem's with row multiplier ``λ``), ``max(φ, 0)`` and
    ``|min(λ, −φ)|``; the best iterate of each row is kept. An empty set (``b`` below the row's least value on the
    chain set) leaves its rows uncertified (``λ`` grows without a root)."""
    def solve(lam: Tensor) -> tuple[ChainBoxResult, Tensor, Tensor]:
        res = project_chain_box(torch.addcmul(v, lam[:, None], a, value=-1.0), lo, hi, perm, links, tol=tol,
                                refine=refine)
        phi = (a * res.w).sum(-1) - b
        row = torch.maximum(phi.clamp_min(0), torch.minimum(lam, -phi).abs())  # primal and complementarity
        return res, phi, torch.maximum(res.kkt_residual, row)

    lam = v.new_zeros(v.shape[0])
    res, phi, kkt = solve(lam)
    w, chain_mu, tau, lam_kept, kkt_kept = res.w, res.chain_mu, res.tau, lam, kkt  # the best iterate of each row
    ends, values = torch.stack([lam, torch.full_like(lam, torch.inf)]), torch.stack([phi, torch.zeros_like(phi)])
    l_p, h_p, a_p = (t.gather(-1, perm) for t in (lo, hi, a))
    safe = (a - a.mean(-1, keepdim=True)).square().sum(-1)  # ≥ |φ'| everywhere
    flat = 1e-9 * safe  # a curvature below this is round-off: φ is flat there (Newton undefined)
    iterations = torch.zeros_like(lam, dtype=torch.long)
    moved = None
    for _ in range(steps):
        ends, values, moved, falsi = _bracket_step(ends, values, moved, lam, phi, phi > 0)  # φ > 0: λ too small
        t_lo, t_hi = ends.unbind(0)
        curv = _row_curvature(res.w.gather(-1, perm), l_p, h_p, links, a_p, tol)
        newton = lam + phi / torch.where(curv > flat, curv, 0.0)  # (flat: ±inf or nan, never inside the bracket)
        grow = torch.maximum(2 * lam, lam + phi / safe)
        step = (kkt > tol) & (phi.abs() > 0)
        lam = torch.where(step, torch.where((newton > t_lo) & (newton < t_hi), newton,
                                            torch.where(t_hi < torch.inf, falsi, grow)), lam)
        iterations = iterations + step.long()
        res, phi, kkt = solve(lam)
        better = kkt < kkt_kept
        w, chain_mu = torch.where(better[:, None], res.w, w), torch.where(better[:, None], res.chain_mu, chain_mu)
        tau, lam_kept = torch.where(better, res.tau, tau), torch.where(better, lam, lam_kept)
        kkt_kept = torch.minimum(kkt, kkt_kept)
    return ChainBoxResult(w, chain_mu, tau, kkt_kept, kkt_kept <= tol, lam_kept, iterations)
