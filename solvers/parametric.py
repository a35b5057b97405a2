"""Fixed-shape, sync-free projection onto box∩simplex ∩ {a·w ≤ b} (one row), with a KKT certificate per row; the
exact box∩simplex projection by sorting; and an exact bracketing search for the few rows the kernel leaves.

``P(v) = argmin ½‖w − v‖²`` over ``{lo ≤ w ≤ hi, Σw = 1, a·w ≤ b}`` is ``w = clamp(v − τ − μa, lo, hi)`` with
``μ ≥ 0`` the row's multiplier and ``τ`` that of ``Σw = 1``. Three stages, each a fixed number of batched
elementwise steps (no sort, no data-dependent control flow, no host synchronisation):

1. ``τ₀`` at ``μ = 0`` (the box∩simplex projection): Newton on the nonincreasing piecewise-linear
   ``f(τ) = Σ clamp(v − τ, lo, hi) − 1`` with the slope ``−|F|`` (``F = {lo ≤ v − τ ≤ hi}``), and a
   false-position step inside the bracket ``[min(v − hi), max(v − lo)]`` where Newton leaves it or nothing is
   free; then ``τ₀`` exactly on the partition it found (where nothing is free, ``w`` is a vertex: ``τ`` moves to
   the end of its interval where one coordinate sits at its bound, and that coordinate counts as free).
2. the parametric path ``μ ↦ (τ(μ), w(μ))`` from 0 (rows violating the row at ``w₀``): on a fixed partition
   (free ``F``; the others at their bounds) ``dτ/dμ = −ā_F`` and ``du/dμ = −(a − ā_F)`` for ``u = v − τ − μa``, so
   ``g(μ) = a·w − b`` falls with slope ``−Σ_F (a − ā_F)²``; each step goes to the root of ``g`` or to the first
   coordinate that changes side, whichever comes first (exact, monotone in ``μ``; a few steps);
3. the last partition fixes ``(τ, μ)`` by a 2×2 linear solve (exact on the root's piece), followed by semismooth
   Newton steps on ``(τ, μ)`` (the partition of ``u``, the same 2×2 system; an exact point is a fixed point),
   safeguarded in ``μ`` against the cycles of a piecewise-linear Newton (:func:`_newton_iterate`); the first one
   moves even from a vertex (one free coordinate: the system is singular), with the bound coordinates weighted.

Each candidate is certified by the full KKT conditions: ``w = clamp(v − τ − μa)`` (stationarity, by
construction), ``|Σw − 1|``, ``max(g, 0)`` and ``|min(μ, −g)|`` at most ``tol``, ``μ ≥ 0``. Rows not certified
in the fixed number of steps (many partition changes, a semismooth Newton cycle, an empty set, degenerate ties)
are left to the caller's exact fallbacks (:func:`solvers.project`: this kernel with more steps when they are many,
:func:`bracket_box_halfspace` when they are few, then its active set). On CPU the kernel's cost is one full-size
pass per op: every full-size intermediate lives in one workspace per call (:func:`_workspace`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FixedShapeResult", "bracket_box_halfspace", "project_box_halfspace"]

_COLUMNS_MAX_K = 8  # up to this K the kernel works on [K, n] (columns = rows of the batch)
# the semismooth Newton safeguard (_newton_iterate): a step of μ that goes back more than this fraction of the last
# one bisects instead (K = 16, all-outside family b, 12 draws of 4096 rows, (3, 0, 9): 0.5, 0.75 and 1 certify all)
_BACK = 0.75
# the weight of the bound coordinates in the first semismooth Newton system where the free set's is singular (a start
# at a vertex, |F| ≤ 1: one dominant teacher; the plain step is 0 there and the row stays put): measured, all-outside
# family b, K = 8, 12 draws, (3, 0, 9): rows left 6 → 3, far-off logits 6660 → 5337 (solvers.two_rows uses 0.3 too)
_DELTA = 0.3
_BOX_SIMPLEX_STEPS = 4  # Newton steps of the box∩simplex projection before its exact step (3 certify on-simplex rows)


@dataclass(frozen=True)
class FixedShapeResult:
    """``w [n, K]``, the row multiplier ``mu [n]`` (``[n, m]`` for ``m`` rows), the KKT residual ``kkt_residual [n]``,
    ``certified [n]`` (``kkt_residual ≤ tol``) and ``iterations [n]``: the steps on the multipliers (along the path in
    ``μ``, and the semismooth Newton steps run where the row binds; 0 where it does not bind)."""

    w: Tensor
    mu: Tensor
    kkt_residual: Tensor
    certified: Tensor
    iterations: Tensor


def _box_simplex(alpha: Tensor, beta: Tensor | None, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Solve Σ_i clamp(α_i + β_i c, lo_i, hi_i) = 1 for c exactly; return (w, c[N,1]). β ≡ 1 when None.

    f(c) is nondecreasing piecewise linear with breakpoints (lo−α)/β (coordinate becomes free, slope += β)
    and (hi−α)/β (coordinate saturates, slope −= β); f(−∞) = Σ lo.
    """
    K = alpha.shape[-1]
    if beta is None:
        bp = torch.cat([lo - alpha, hi - alpha], dim=-1)
    else:
        bp = torch.cat([(lo - alpha) / beta, (hi - alpha) / beta], dim=-1)
    bp_s, idx = bp.sort(dim=-1)
    if beta is None:
        step = torch.where(idx < K, 1.0, -1.0).to(alpha.dtype)
    else:
        step = torch.cat([beta, -beta], dim=-1).gather(-1, idx)
    tri = torch.ones(2 * K, 2 * K, dtype=alpha.dtype, device=alpha.device).triu()  # x @ tri = cumsum (a GEMM: faster)
    slope = step @ tri  # slope on (bp_j, bp_{j+1})
    gain = (slope[..., :-1] * bp_s.diff(dim=-1)) @ tri[:-1, :-1]
    f = torch.cat([torch.zeros_like(gain[..., :1]), gain], dim=-1) + lo.sum(-1, keepdim=True)
    j = (f < 1).sum(-1, keepdim=True)  # first breakpoint with f ≥ 1
    jm = (j - 1).clamp(0, 2 * K - 1)
    s = slope.gather(-1, jm)
    c = bp_s.gather(-1, jm) + (1 - f.gather(-1, jm)) / torch.where(s > 0, s, torch.ones_like(s))
    c = torch.where(j == 0, bp_s[..., :1], c)
    c = torch.where(j == 2 * K, bp_s[..., -1:], c)
    w = (alpha + c if beta is None else alpha + beta * c).clamp(lo, hi)
    # w = clamp(...) with lo ≤ hi elementwise: torch.clamp with tensor bounds applies max then min
    return w, c


def _euclid_box_simplex_u(v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Euclidean projection onto {lo ≤ w ≤ hi, Σw = 1} (rows of v; invariant to v + const): ``(w, u)``, the
    projection ``w = clamp(u, lo, hi)`` and its unclamped values ``u = v − τ``, by the exact breakpoint search
    (:func:`_box_simplex`: a sort; fixed shape, no host synchronisation)."""
    alpha = v - v.amax(-1, keepdim=True)
    w, c = _box_simplex(alpha, None, lo, hi)
    return w, alpha + c


def _euclid_box_simplex_fast(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The ``w`` of :func:`_euclid_box_simplex_u`, eagerly: ``τ`` by ``_BOX_SIMPLEX_STEPS`` safeguarded Newton steps
    and the exact step on their partition, certified where ``|Σw − 1|`` is at round-off (every on-simplex row in
    the benchmarks, ~3/4 of far-off logits), the other rows by the breakpoint search (reading their count is a host
    synchronisation). It agrees with the breakpoint search to round-off, not bit for bit."""
    shape, K = v.shape, v.shape[-1]
    flat = tuple(t.expand(shape).reshape(-1, K) for t in (v, lo, hi))
    w, ok = _box_simplex_newton(*flat, _BOX_SIMPLEX_STEPS)
    rest = (~ok).nonzero()[:, 0]
    if rest.numel():
        w = w.index_put((rest,), _euclid_box_simplex_u(*(t[rest] for t in flat))[0])
    return w.reshape(shape)


def _euclid_box_simplex(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Euclidean projection onto {lo ≤ w ≤ hi, Σw = 1} (the ``w`` of :func:`_euclid_box_simplex_u`)."""
    return _euclid_box_simplex_u(v, lo, hi)[0]


def _box_simplex_newton(v: Tensor, lo: Tensor, hi: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``(w, certified)`` for rows ``v, lo, hi [n, K]``: ``τ`` by :func:`_newton_tau`, then exact on the strict
    partition (``τ += (Σ clamp(v − τ) − 1) / |F|``); ``certified`` where ``|Σw − 1| ≤ 16·eps·K`` (``w = clamp(v − τ)``
    is then the projection: stationarity holds by construction)."""
    if v.shape[-1] <= _COLUMNS_MAX_K:
        ax = 0
        v, lo, hi = (t.T.contiguous() for t in (v, lo, hi))
    else:
        ax = -1
        v, lo, hi = (t.contiguous() for t in (v, lo, hi))
    ws = v.new_empty(7, *v.shape)
    tau = _newton_tau(v, lo, hi, steps, ws, ax)
    u = torch.sub(v, tau, out=ws[6])
    torch.lt(lo, u, out=ws[1]).mul_(torch.lt(u, hi, out=ws[2]))  # strictly free
    torch.clamp(u, lo, hi, out=ws[0])
    r, n = _sums(ws[:2], ax).unbind(0)
    u = torch.sub(v, torch.where(n > 0, tau + (r - 1) / n.clamp_min(1), tau), out=ws[6])
    w = torch.clamp(u, lo, hi, out=ws[0])
    ok = ((w.sum(ax, keepdim=True) - 1).abs() <= 16 * torch.finfo(v.dtype).eps * v.shape[ax]).reshape(-1)
    return (w.T if ax == 0 else w), ok


def _workspace(v: Tensor, a: Tensor) -> Tensor:
    """``[11, *v.shape]`` of ``v``'s dtype: every full-size intermediate of the kernel lives in one of these slots
    (``out=`` / in place), so a call allocates (and the OS maps) its full-size memory once, not once per op (on one
    CPU thread, fresh memory for every intermediate cost ~25–40% of the kernel's time, measured). Slots ``0…4`` hold the stacked
    quantities summed together (:func:`_sums`), ``5`` the kept iterate, ``6`` ``u``, ``7…8`` temporaries, ``9…10``
    ``a`` and ``a²`` (the moments of the free set in one product, :func:`_free_moments`)."""
    ws = v.new_empty(11, *v.shape)
    torch.mul(ws[9].copy_(a), a, out=ws[10])
    return ws


def _sums(stack: Tensor, ax: int) -> Tensor:
    """The sums over the teacher axis ``ax`` of the stacked ``stack [S, …]``, one reduction: ``S`` per-row sums."""
    return stack.sum(1 if ax == 0 else -1, keepdim=True)


def _bracket_step(ends: Tensor, values: Tensor, moved: Tensor | None, x: Tensor, f: Tensor,
                  up: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One update of the brackets ``[t_lo, t_hi]`` of a nonincreasing ``f`` (``f(t_lo) ≥ 0 ≥ f(t_hi)``), their ends and
    values stacked (``ends``, ``values [2, …]``: one op updates both): ``x`` replaces the lower end where ``up``
    (``f(x) > 0``), else the upper; an end kept twice in a row has its value halved (Illinois: false position then
    converges superlinearly). ``moved``: the previous update's ``moves`` (None at the first). Returns ``(ends, values,
    moves, falsi)``, ``falsi`` the false-position point inside the new bracket. (Row-sized bookkeeping costs its
    dispatch, not its data.)"""
    moves = torch.stack([up, ~up])
    if moved is not None:
        values = torch.where(moves | moved, values, values / 2)
    ends, values = torch.where(moves, x, ends), torch.where(moves, f, values)
    (t_lo, t_hi), (f_lo, f_hi) = ends.unbind(0), values.unbind(0)
    falsi = torch.addcmul(t_lo, t_hi - t_lo, f_lo / (f_lo - f_hi).clamp_min(torch.finfo(f.dtype).tiny))
    return ends, values, moves, falsi


def _newton_tau(v: Tensor, lo: Tensor, hi: Tensor, steps: int, ws: Tensor, ax: int) -> Tensor:
    """``τ`` (one per row: size 1 along the teacher axis ``ax``) with ``Σ clamp(v − τ, lo, hi) = 1`` after ``steps``
    safeguarded Newton steps (module doc; the false-position safeguard is Illinois's, :func:`_bracket_step`: 8 steps
    certify every far-off logits row where nothing is free, plain false position 3–5 leave ~25%). Uses slots 0, 1
    and 6 of ``ws``."""
    w, free, u = ws[0], ws[1], ws[6]
    ends = torch.stack([torch.sub(v, hi, out=u).amin(ax, keepdim=True),  # [t_lo, t_hi]: f(t_lo) ≥ 0 ≥ f(t_hi)
                        torch.sub(v, lo, out=u).amax(ax, keepdim=True)])
    values = torch.stack([hi.sum(ax, keepdim=True), lo.sum(ax, keepdim=True)]).sub_(1)  # [f(t_lo), f(t_hi)]
    tau = (v.sum(ax, keepdim=True) - 1) / v.shape[ax]
    moved = None
    for _ in range(steps):
        torch.sub(v, tau, out=u)
        torch.eq(torch.clamp(u, lo, hi, out=w), u, out=free)  # ties count free: a shorter step, never a wrong one
        f, n = _sums(ws[:2], ax).unbind(0)
        f = f - 1
        ends, values, moved, falsi = _bracket_step(ends, values, moved, tau, f, f > 0)  # f > 0: τ increases
        t_lo, t_hi = ends.unbind(0)
        newton = tau + f / n  # ±inf or nan where nothing is free: never inside the bracket
        tau = torch.where(newton.clamp(t_lo, t_hi) == newton, newton, falsi)
    return tau


def _solve2(n: Tensor, sa: Tensor, saa: Tensor, p: Tensor, q: Tensor, active: Tensor,
            y_else: Tensor | float, x: bool = True) -> tuple[Tensor | None, Tensor]:
    """``(x, y)`` with ``[[n, sa], [sa, saa]] (x, y) = (p, q)`` where ``active`` and the system is regular, else
    ``y = y_else`` and ``x`` from the first equation (``x`` None unless asked for)."""
    nsaa = n * saa  # (fused ops: these row-sized ones cost their dispatch, not their data)
    det = torch.addcmul(nsaa, sa, sa, value=-1)
    solvable = active & (det > 64 * torch.finfo(det.dtype).eps * nsaa)
    y = torch.where(solvable, torch.addcmul(n * q, sa, p, value=-1) / det, y_else)  # (inf/nan elsewhere: not taken)
    return (torch.addcmul(p, sa, y, value=-1) / n.clamp_min(1) if x else None), y


def _free_moments(ws: Tensor) -> None:
    """``F·a`` and ``F·a²`` into slots 3 and 4 from the free indicator ``F`` (0/1) in slot 2."""
    torch.mul(ws[2:3], ws[9:11], out=ws[3:5])


def _exact_on_partition(v: Tensor, lo: Tensor, hi: Tensor, a: Tensor, b: Tensor, u: Tensor, active: Tensor,
                        mu_else: Tensor | float, ws: Tensor, ax: int) -> tuple[Tensor, Tensor]:
    """``(τ, μ)`` (one per row, size 1 along ``ax``) solving ``Σw = 1`` (and ``a·w = b`` where ``active``) with
    ``w = v − τ − μa`` on the free coordinates (``F``, 0/1 in slot 2) and ``w = clamp(u, lo, hi)`` (their bound) on
    the others: ``[[|F|, Σ_F a], [Σ_F a, Σ_F a²]] (τ, μ) = (Σx − 1, a·x − b)`` with ``x = F·v + (1 − F)·w``
    (``μ = mu_else`` where inactive or singular)."""
    x, ax_ = ws[0], ws[1]
    torch.clamp(u, lo, hi, out=x)
    x.add_(torch.sub(v, x, out=ax_).mul_(ws[2]))
    torch.mul(a, x, out=ax_)
    _free_moments(ws)
    sx, sax, n, sa, saa = _sums(ws[:5], ax).unbind(0)
    return _solve2(n, sa, saa, sx - 1, sax - b, active, mu_else)


def _newton_iterate(v: Tensor, lo: Tensor, hi: Tensor, a: Tensor, b: Tensor, tau: Tensor, mu: Tensor, ws: Tensor,
                    ax: int, residual: bool = True, mu_prev: Tensor | None = None,
                    totals: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
    """At ``(τ, μ)`` (one per row, size 1 along ``ax``): ``w = clamp(v − τ − μa, lo, hi)`` (stationary by
    construction; in slot 0), its KKT residual ``max(|Σw − 1|, max(g, 0), |min(μ, −g)|)`` (``g = a·w − b``), and
    the next semismooth Newton iterate: on the free coordinates (``w = u``) ``Σw − 1 = r`` and ``g`` move by
    ``−[[|F|, Σ_F a], [Σ_F a, Σ_F a²]] (Δτ, Δμ)`` where the row binds (``μ > 0`` or ``g > 0``; elsewhere, and where
    the 2×2 system is singular, ``Δμ = 0``), safeguarded: ``Δμ ≥ −μ/2`` (an overshoot clipped to ``μ = 0`` threw ``τ``
    off the simplex and restarted the path: 6-cycles), and, given the previous iterate's ``μ_prev``, a step that goes
    back past ``μ − _BACK·(μ − μ_prev)`` (the Newton steps reverse: a 2-cycle ``μ_prev ↔ μ`` between two partitions)
    ends at the midpoint ``(μ + μ_prev)/2`` (a heuristic bisection: it keeps no bracket, so it never excludes ``μ*``);
    then ``Δτ`` from the first equation. ``totals`` (``K, Σa, Σa²`` stacked): where the system is singular, ``Δμ``
    from the system in which the bound coordinates weigh ``_DELTA`` (a start at a vertex moves). An exact point stays a
    fixed point. Returns ``(kkt, τ', μ')`` (``kkt`` None unless ``residual``)."""
    w, u = ws[0], ws[6]
    torch.sub(v, tau, out=u).addcmul_(a, mu, value=-1.0)
    torch.clamp(u, lo, hi, out=w)
    torch.mul(a, w, out=ws[1])
    torch.eq(w, u, out=ws[2])
    _free_moments(ws)
    sums = _sums(ws[:5], ax)
    sw, saw, n, sa, saa = sums.unbind(0)
    r, g = sw - 1, saw - b
    kkt = torch.maximum(torch.maximum(r.abs(), g.clamp_min(0)), torch.minimum(mu, -g).abs()) if residual else None
    binds = torch.maximum(g, mu) > 0
    dmu_else = 0.0
    if totals is not None:  # where the system is singular (|F| ≤ 1: a vertex), the bound coordinates weigh _DELTA
        _, dmu_else = _solve2(*torch.lerp(sums[2:], totals, _DELTA).unbind(0), r, g, binds, 0.0, x=False)
    _, dmu = _solve2(n, sa, saa, r, g, binds, dmu_else, x=False)
    if mu_prev is not None:
        last = mu - mu_prev
        dmu = torch.where(torch.add(dmu, last, alpha=_BACK).mul_(last) < 0, last * -0.5, dmu)
    dmu = torch.maximum(dmu, mu * -0.5)
    return kkt, tau + torch.addcmul(r, sa, dmu, value=-1) / n.clamp_min(1), mu + dmu


def _polish(v: Tensor, lo: Tensor, hi: Tensor, a: Tensor, b: Tensor, tau: Tensor, mu: Tensor, steps: int,
            ws: Tensor, ax: int, shrink: tuple[int, float] | None = None,
            mu_prev: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(w, μ, KKT residual)`` at ``(τ, μ)``, replaced by the point after ``steps`` semismooth Newton steps where that
    one's residual is smaller (an exact point is a fixed point). ``w`` is slot 5 of the workspace. ``shrink = (s,
    tol)`` (eager callers only: a host synchronisation): after ``s`` steps the rows already certified (residual ≤
    ``tol``) stop and the others go on alone, in a smaller batch. ``mu_prev``: the iterate before ``(τ, μ)`` (for the
    safeguard of :func:`_newton_iterate`; its first step has none, and moves from a vertex: its ``totals``)."""
    totals = None if mu_prev is not None else torch.cat([torch.full_like(tau, v.shape[ax])[None],  # K, Σa, Σa²
                                                         _sums(ws[9:11], ax)])
    kkt, tau, mu_next = _newton_iterate(v, lo, hi, a, b, tau, mu, ws, ax, True, mu_prev, totals)
    w = ws[5].copy_(ws[0])
    stop = shrink[0] if shrink is not None and shrink[0] < steps else steps
    mu_k = mu
    for i in range(stop):  # the residual of the last one only
        mu_k, (kkt_k, tau, mu_next) = mu_next, _newton_iterate(v, lo, hi, a, b, tau, mu_next, ws, ax, i == stop - 1,
                                                               mu_k)
    if stop:
        better = kkt_k < kkt
        keep = better.to(v.dtype)
        w.mul_(1 - keep).addcmul_(ws[0], keep)  # an exact select (x·1 + y·0 = x): w stays a clamp into [lo, hi]
        kkt, mu = torch.where(better, kkt_k, kkt), torch.where(better, mu_k, mu)
    if stop == steps:
        return w, mu, kkt
    dim = 1 if ax == 0 else 0  # the batch's rows
    rest = (kkt.reshape(-1) > shrink[1]).nonzero()[:, 0]
    if rest.numel():
        v_r, lo_r, hi_r, a_r, b_r, tau_r, mu_r, prev_r = (t.index_select(dim, rest)
                                                          for t in (v, lo, hi, a, b, tau, mu_next, mu_k))
        w_r, mu_r, kkt_r = _polish(v_r, lo_r, hi_r, a_r, b_r, tau_r, mu_r, steps - stop - 1, _workspace(v_r, a_r), ax,
                                   mu_prev=prev_r)
        better = kkt_r < kkt.index_select(dim, rest)
        w.index_copy_(dim, rest, torch.where(better, w_r, w.index_select(dim, rest)))
        mu = mu.index_copy(dim, rest, torch.where(better, mu_r, mu.index_select(dim, rest)))
        kkt = kkt.index_copy(dim, rest, torch.minimum(kkt_r, kkt.index_select(dim, rest)))
    return w, mu, kkt


def project_box_halfspace(v: Tensor, lo: Tensor, hi: Tensor, a: Tensor, b: Tensor, *, tol: float,
                          newton_steps: int = 3, path_steps: int = 3, newton_polish: int = 6,
                          shrink_after: int | None = None) -> FixedShapeResult:
    """Projection of ``v [n, K]`` onto ``{lo ≤ w ≤ hi, Σw = 1, a·w ≤ b}`` (``lo, hi, a [n, K]``, ``b [n]``) by a
    fixed sequence of batched tensor ops: ``newton_steps`` for ``τ₀``, ``path_steps`` along the path in ``μ``, the
    exact finish on the last partition, then ``newton_polish`` semismooth Newton steps on ``(τ, μ)`` (the last
    iterate replaces the path's point where its KKT residual is smaller). Computes in ``v.dtype``; compiles with
    ``torch.compile(fullgraph=True)`` (no graph break, no host synchronisation). Every row carries its certificate
    (``certified``: KKT residual ≤ ``tol``); uncertified rows must be solved by an exact fallback. ``shrink_after``
    (eager callers, one host synchronisation): after that many semismooth Newton steps the certified rows stop and
    the others go on in a smaller batch (the same points, less work).
    """
    # [K, n] up to _COLUMNS_MAX_K: a reduction over K adds K contiguous rows instead of reducing n short ones
    if v.shape[-1] <= _COLUMNS_MAX_K:
        ax = 0
        v, lo, hi, a = (t.T.contiguous() for t in (v, lo, hi, a))
        b = b[None, :]
    else:
        ax = -1
        v, lo, hi, a = (t.contiguous() for t in (v, lo, hi, a))  # broadcast (stride-0) inputs are slow to read
        b = b[:, None]
    ws = _workspace(v, a)
    F, u, t1, t2 = ws[2], ws[6], ws[7], ws[8]
    tau = _newton_tau(v, lo, hi, newton_steps, ws, ax)
    # the partition at τ (ties count as bound), then τ exact on it; masks are 0/1 in v.dtype (a comparison written
    # into a float tensor is ~2× cheaper on CPU than a bool mask and its conversion)
    torch.sub(v, tau, out=u)
    upp = torch.ge(u, hi, out=t1)
    torch.maximum(torch.le(u, lo, out=t2), upp, out=F).neg_().add_(1)
    torch.clamp(u, lo, hi, out=ws[1])
    r, n = _sums(ws[1:3], ax).unbind(0)
    no_free = n == 0
    tau = torch.where(no_free, tau, tau + (r - 1) / n.clamp_min(1))
    # nothing free (w at a vertex; τ anywhere in an interval): move τ to the interval's end where the coordinate
    # at its upper bound nearest to freeing sits exactly at it, and count that coordinate free (then |F| ≥ 1; a
    # coordinate exactly at its bound is free or bound alike)
    torch.sub(v, tau, out=u)
    far = torch.finfo(v.dtype).max / 4  # "no coordinate at its upper bound": above any gap u − hi of finite data
    gap = torch.sub(u, hi, out=t2).addcmul_(upp.neg_().add_(1), v.new_tensor(far))  # u − hi on U, else ≥ far
    first = gap.amin(ax, keepdim=True)
    moves = no_free & (first < far / 2)
    F.add_(torch.eq(gap, torch.where(moves, first, math.nan), out=t1))  # (coordinates tied there: all of them)
    tau = tau + torch.where(moves, first, 0.0)
    mu = torch.zeros_like(tau)
    steps = torch.zeros_like(tau, dtype=torch.long)
    if path_steps:
        tau, mu, steps = _path(v, lo, hi, a, b, tau, mu, steps, path_steps, ws, ax)
    w, mu, kkt = _polish(v, lo, hi, a, b, tau, mu, newton_polish, ws, ax,
                         None if shrink_after is None else (shrink_after, tol))
    kkt, mu = kkt.reshape(-1), mu.reshape(-1)
    return FixedShapeResult(w.T if ax == 0 else w, mu, kkt, kkt <= tol, steps.reshape(-1) + newton_polish * (mu > 0))


def _path(v: Tensor, lo: Tensor, hi: Tensor, a: Tensor, b: Tensor, tau: Tensor, mu: Tensor, steps: Tensor,
          path_steps: int, ws: Tensor, ax: int) -> tuple[Tensor, Tensor, Tensor]:
    """``path_steps`` steps along the path in ``μ`` from ``(τ, μ = 0)`` (free set 0/1 in slot 2; the rows with
    ``a·w₀ ≤ b`` stay), then ``(τ, μ)`` exact on the last partition where ``μ > 0`` (module doc, stage 2–3); returns
    ``(τ, μ, steps taken)``. (With no path step every ``μ`` is 0 and the exact finish changes nothing: skipped.)"""
    F, u, t1, t2, t3 = ws[2], ws[6], ws[7], ws[8], ws[3]  # (slots 3–4 are free between the moments' sums)
    torch.sub(v, tau, out=u)
    g = torch.clamp(u, lo, hi, out=t1).mul_(a).sum(ax, keepdim=True) - b
    done = g <= 0
    idle = torch.zeros_like(steps)  # the steps a row was already done at
    tiny = torch.finfo(v.dtype).tiny
    d, event = ws[5], ws[0]
    for _ in range(path_steps):
        _free_moments(ws)
        n, sa, saa = _sums(ws[2:5], ax).unbind(0)
        abar = sa / n.clamp_min(1)
        torch.sub(abar, a, out=d)  # du/dμ on this partition
        descent = torch.addcmul(saa, sa, abar, value=-1)  # −dg/dμ = Σ_F (a − ā)² ≥ 0
        to_root = g / descent.clamp_min(tiny)
        # when each coordinate changes side: a free one at the bound ahead ((lo − u)/d, (hi − u)/d: the larger), a
        # bound one where it frees (the smaller, if ≥ 0); d = 0 gives ±inf or nan: no event (no torch.where on
        # [n, K]: it is slow on CPU)
        t_lo, t_hi = torch.sub(lo, u, out=t1).div_(d), torch.sub(hi, u, out=t2).div_(d)
        t_min = torch.minimum(t_lo, t_hi, out=event)
        spread = torch.maximum(t_lo, t_hi, out=t3).sub_(t_min)
        rate = event.addcmul_(F, spread).reciprocal_().nan_to_num_(nan=0.0, posinf=math.inf)  # −0 → +0 (at a bound);
        top = rate.amax(ax, keepdim=True)  # rate > 0: an event ahead (inf: now)
        first = top.clamp_min(0).reciprocal()
        root = to_root <= first  # (true wherever no event is ahead and the root is finite)
        step = torch.where(done, 0.0, torch.minimum(to_root, first))
        mu, tau = mu + step, torch.addcmul(tau, step, abar, value=-1)
        u.addcmul_(d, step)
        idle.add_(done)
        done = done | root
        # the coordinates of the first event change side (a row with no event ahead and no finite root
        # flips garbage: its μ is infinite, and its certificate fails)
        hit = torch.ge(rate, torch.where(done, math.nan, top), out=t1)
        F.sub_(hit).abs_()  # F xor hit (both 0/1)
        g = torch.addcmul(g, step, descent, value=-1)
    steps = steps + (path_steps - idle)
    act = mu > 0
    tau_x, mu_x = _exact_on_partition(v, lo, hi, a, b, u, act, 0.0, ws, ax)
    return torch.where(act, tau_x, tau), torch.where(act, mu_x, mu), steps


def bracket_box_halfspace(v: Tensor, lo: Tensor, hi: Tensor, a: Tensor, b: Tensor, *, tol: float,
                          points: int = 65, rounds: int = 3, newton_polish: int = 2) -> FixedShapeResult:
    """The projection of :func:`project_box_halfspace` by bracketing the row multiplier, for the few rows that kernel
    leaves uncertified: ``φ(μ) = a·P(v − μa) − b`` is nonincreasing and piecewise linear (``P`` the exact box∩simplex
    projection by sorting, :func:`_euclid_box_simplex_u`). Each round evaluates ``φ`` at ``points`` values of ``μ`` per
    row at once (the first on ``{0} ∪`` a log grid over ``[1e-8, 1e8]``, the next ones evenly inside the bracket
    found); the partition at the last bracket's middle then fixes ``(τ, μ)`` by a 2×2 solve, and ``newton_polish``
    semismooth Newton steps follow. Exact unless a partition change lies inside the last bracket (relative width
    ``(10^(16/(points − 2)) − 1) / (points − 1)^(rounds − 1)``: 2e-4 by default) or the root lies above 1e8; the
    certificate (as for the kernel) says which. About ``rounds · points`` times the kernel's work per row, in ~200
    tensor ops whatever the row count."""
    n, K = v.shape
    mus = torch.cat([v.new_zeros(1), torch.logspace(-8, 8, points - 1, dtype=v.dtype, device=v.device)]).expand(n, -1)
    inside = torch.linspace(0, 1, points, dtype=v.dtype, device=v.device)[1:-1]
    mu_lo, mu_hi = v.new_zeros(n, 1), v.new_full((n, 1), math.inf)
    v3, a3 = v[:, None, :], a[:, None, :]
    for k in range(rounds):
        if k:
            mus = torch.where(mu_hi < math.inf, torch.addcmul(mu_lo, mu_hi - mu_lo, inside), mu_lo)
        x = torch.addcmul(v3, mus[..., None], a3, value=-1.0)
        w, _ = _euclid_box_simplex_u(x, lo[:, None, :].expand_as(x), hi[:, None, :].expand_as(x))
        j = ((a3 * w).sum(-1) > b[:, None]).sum(-1, keepdim=True)  # the first grid point with φ ≤ 0
        m = mus.shape[-1]
        mu_lo = torch.where(j > 0, mus.gather(-1, (j - 1).clamp_min(0)), mu_lo)
        mu_hi = torch.where(j < m, mus.gather(-1, j.clamp_max(m - 1)), mu_hi)
    mu = (mu_lo + mu_hi) / 2  # 0 where φ(0) ≤ 0 (the row does not bind), inf where no root was found
    _, u = _euclid_box_simplex_u(torch.addcmul(v, mu, a, value=-1.0), lo, hi)
    ws = _workspace(v, a)
    ws[2] = (u > lo) & (u < hi)  # free
    tau, mu = _exact_on_partition(v, lo, hi, a, b[:, None], u, mu > 0, mu, ws, -1)
    w, mu, kkt = _polish(v, lo, hi, a, b[:, None], tau, mu, newton_polish, ws, -1)
    kkt, mu = kkt.reshape(-1), mu.reshape(-1)
    return FixedShapeResult(w, mu, kkt, kkt <= tol, (rounds + newton_polish) * (mu > 0))
