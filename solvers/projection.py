"""Exact batched projection onto a :class:`~solvers.sets.FeasibleSet`.

Euclidean: ``P(v) = argmin_{w∈F} ½‖w − v‖²``; KL (box∩simplex only): ``argmin_{w∈F} Σ w log(w/v) − w + v``.

Kernels (all batched over rows ``[N, K]``, no Python loop over rows):

* box∩simplex: ``w = clamp(α + β c, lower, upper)`` with the scalar ``c`` solving ``Σ w = 1``, found exactly by
  a breakpoint search (sort the 2K breakpoints, cumulative piecewise-linear sum, linear solve on the segment).
  Euclidean: ``α = v, β = 1`` (``c = −τ``); KL: ``α = 0, β = v`` (``c = e^{−ν}``).
* one row ``a·w ≤ b`` without a chain (Euclidean): the fixed-shape path of :mod:`solvers.parametric` on every
  row (no sort, no host synchronisation, a KKT certificate per row); uncertified rows get it again with more
  steps, and only those still uncertified take the general path below.
* rows ``A w ≤ b``: the box∩simplex projection first (most rows are feasible there and are done); the rows
  still violated are screened for emptiness (next item). Sets with an ordinal chain (``FeasibleSet.chain``, from
  ``order_by``) then take closed forms on the superset ``C = {Σw = 1, w ≥ 0, w decreasing along the chain}``: the
  chain point ``P_C(v) = max(iso(v) − τ, 0)`` (:mod:`solvers.isotonic`), the projection onto the full set wherever
  it lies in it; where it violates one other row, ``P_C(v − λa)`` with the row active — for ``K ≤ _ENUM_MAX_K``
  over all ``2^K − 1`` block structures at once (:mod:`solvers.ordered`), above it by a safeguarded
  Newton search on ``λ``. Such points are certified structurally (the chain rows are those of ``C``,
  every constraint holds, multipliers ≥ 0, complementarity), stationarity holding by construction. The rest go to
  the batched Goldfarb–Idnani dual active-set method (:mod:`solvers.active_set`; bounds and rows are
  inequalities, ``Σw = 1`` an equality; finite, exact up to round-off, active normals kept independent),
  warm-started from the chain point where there is one, and every such row is verified by stationarity
  ``w = P_box∩Δ(v − Aᵀμ)`` and complementarity. Rows it cannot finish (jointly empty rows, ``max_iter``) are
  relaxed by LP and re-solved; the cvxpy reference is the last resort, flagged ``MAX_ITER``.
* empty rows: the box is relaxed by the least ``t`` making ``Σ lower ≤ 1 ≤ Σ upper`` (closed form, a simplex
  threshold), then the soft rows by the least uniform ``t`` with ``{A w ≤ b + t}`` non-empty (hard rows kept):
  ``t* = min_{w∈box∩Δ, hard rows} max_r (a_r·w − b_r)``. With one soft row it is a linear minimum, in closed
  form where a minimiser over a superset is certified feasible: the least prefix mean of ``a`` along a hard
  chain (a vertex of ``C``), or the greedy fill by ascending ``a`` over box∩Δ; otherwise (several soft rows, or
  no certificate) one block-diagonal scipy ``linprog`` (HiGHS) over all affected rows. Only rows infeasible at
  the box∩simplex projection can be empty, so only those are checked. Such rows are flagged ``RELAXED`` with
  ``relaxation = t``.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from solvers.active_set import solve_active_set
from solvers.chain_box import project_chain_box, project_chain_box_halfspace
from solvers.errors import InfeasibleError, holds
from solvers.isotonic import block_means, isotonic_decreasing
from solvers.ordered import project_ordered_halfspace
from solvers.parametric import (FixedShapeResult, _box_simplex, _euclid_box_simplex, _euclid_box_simplex_fast,
                                _euclid_box_simplex_u, bracket_box_halfspace, project_box_halfspace)
from solvers.results import ProjectionResult, Status, projection_message, projection_success
from solvers.sets import FeasibleSet
from solvers.two_rows import project_box_two_halfspaces

__all__ = ["project"]

logger = logging.getLogger(__name__)

_METRICS = ("euclidean", "kl")
# fixed-shape steps of solvers.parametric (τ₀ Newton, path in μ, semismooth Newton) by K: the fewest that certify
# all but ≤ 0.1% of the all-outside benchmark rows (v on the simplex; measured, N = 4096, 12 draws; off-simplex
# points leave more to the retries); the path alone finishes small K, the Newton steps cross the many partition
# changes of large K. K = 16: 9 Newton steps with the safeguard of solvers.parametric._newton_iterate certify every
# row of 24 draws (8 without it left 51 rows, 0–5 a draw, each draw then paying the ~1.5 ms bracketing retry; with it
# 8 leave 1 in 12 draws), at the kernel time of the unsafeguarded 8 (side by side, one thread, eager: the 9th step
# runs only on the ~7% of rows left after _SHRINK_AFTER); K = 32: 10 certify every row of 24 draws (9 leave 1).
# K = 8: the same 9 leave 4 rows in 12 draws (the path's (3, 5, 2): 6) in a ~20% faster kernel; at K = 5–7 they leave
# 13–142 (the path: 0–1), and the path steps stay
_FIXED_STEPS = ((4, (3, 4, 0)), (7, (3, 5, 2)), (16, (3, 0, 9)), (math.inf, (3, 0, 10)))
# eagerly, after this many semismooth Newton steps the certified rows stop and the others go on in a smaller batch
# (measured, one thread, N = 4096: the kernel 5–10% faster at K = 16, 10–20% at K = 32; the same points)
_SHRINK_AFTER = 5
_FIXED_STEPS_RETRY = (6, 6, 8)  # on the rows left when they are many: certifies all but ~3% of the off-simplex ones
# the rows left, up to this many rows·K, go to the bracketing search of solvers.parametric (it certified every row the
# kernel left in 20 draws at K = 8–32, and all but ~1% of hard off-simplex rows, but costs ~30× the kernel's work per
# row in ~200 tensor ops): beyond it the kernel with the retry steps goes first (measured, one thread: 1.3–2 ms on a
# few rows either way; the bracket then costs ~0.2–0.5 ms more per row)
_BRACKET_MAX_ELEMENTS = 128
# chain ∩ one active row: up to this K by enumerating the 2^K − 1 block structures (solvers.ordered), above it by
# the Newton search on λ (measured, one thread, chain + cap + one row: enumeration 2.6× / 1.5× faster than Newton at
# K = 4 for N = 1024 / 4096, even at K = 5, 1.1–1.7× slower at K = 6; Newton 1.2× faster than the warm-started
# active set at K = 7, on par at K = 16–32)
_ENUM_MAX_K = 5
# Newton steps on τ of the chain kernel inside a graph (solvers.chain_box: 3 leave ~1 in 40 off-simplex rows of a
# chain with a cap and a floor uncertified, 6 none in the tests)
_CHAIN_REFINE = 6
# Newton steps on the row multiplier of a chain with one more row inside a graph (solvers.chain_box; benchmark family
# c, N = 2048, K = 4/8/16: 8 certify 99.85/99.9/99.85% of the rows; every row outside its set: 98.8/96.5/96.3%, most
# of the rest sets the row empties; 12 steps certify ≤ 0.2% more at 1.5× the time and tracing)
_CHAIN_ROW_STEPS = 8


def _tolerance(dtype: torch.dtype) -> float:
    """KKT tolerance: 1e-10 in float64, 100·eps otherwise (~1.2e-5 in float32)."""
    return 1e-10 if dtype == torch.float64 else 100.0 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------- box ∩ simplex
def _kl_box_simplex(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """KL projection: w = clamp(v·c, lo, hi) with Σw = 1 (v > 0, rescaled by its max for range)."""
    return _box_simplex(torch.zeros_like(v), v / v.amax(-1, keepdim=True), lo, hi)[0]


# ---------------------------------------------------------------------------------------------- relaxations
def _relax_box(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Least t ≥ 0 with Σ max(lo−t, 0) ≤ 1 ≤ Σ min(hi+t, 1) (both simplex thresholds), per row of
    ``lo, hi [N, K]``: returns the relaxed box ``(max(lo − t, 0), min(hi + t, 1))`` and ``t [N]`` (0: unchanged)."""
    zero, one = torch.zeros_like(lo), torch.ones_like(lo)
    t = torch.zeros_like(lo[..., 0])
    over = lo.sum(-1) > 1
    under = hi.sum(-1) < 1
    compiling = torch.compiler.is_compiling()  # in a graph: both closed forms on every row (fixed shape, no sync)
    if compiling or bool(over.any()):
        t = torch.where(over, -_box_simplex(lo, None, zero, one)[1][..., 0], t)
    if compiling or bool(under.any()):
        t = torch.maximum(t, torch.where(under, _box_simplex(hi, None, zero, one)[1][..., 0], t))
    t = t.clamp_min(0)
    return (lo - t[:, None]).clamp_min(0), (hi + t[:, None]).clamp_max(1), t


def _argmin_linear(a: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """argmin_{w ∈ box∩Δ} a_r·w for every row r (greedy fill by ascending a): a [N,m,K] → w [N,m,K]."""
    a_s, idx = a.sort(dim=-1)
    cap = (hi - lo)[:, None, :].expand_as(a).gather(-1, idx)
    room = (1 - lo.sum(-1))[:, None, None]
    before = cap.cumsum(-1) - cap
    fill = torch.minimum((room - before).clamp_min(0), cap)
    return lo[:, None, :] + torch.zeros_like(a).scatter_(-1, idx, fill)


def _holds(A: Tensor, b: Tensor, w: Tensor, tol: float) -> Tensor:
    """Rows where ``A w ≤ b + tol`` (``A [n, m, K]``, ``b [n, m]``, ``w [n, K]``)."""
    return ((A * w[:, None, :]).sum(-1) - b <= tol).all(-1)


def _least_relaxation(A: Tensor, b: Tensor, lo: Tensor, hi: Tensor, soft: Tensor, chain_row: Tensor | None,
                      chain: tuple[Tensor, Tensor] | None, tol: float) -> tuple[Tensor, Tensor]:
    """Per row of the batch: ``(t, exact)``, a lower bound ``t ≥ 0`` on the least uniform relaxation
    ``t* = min_{w∈box∩Δ, hard rows} max_{r soft} (a_r·w − b_r)`` (clamped at 0) and where it is ``t*`` itself.

    The bound is ``max_r min_{w∈S} a_r·w − b_r`` over supersets ``S`` of the feasible region: ``box∩Δ`` (greedy
    fill) and, given ``chain = (perm [n, K], links [n, K−1])`` whose rows (``chain_row [m]``) are all hard, the
    ordered simplex ``C`` (least prefix mean, :func:`_argmin_over_chain`; its vertex meets the chain rows by
    construction). With one soft row it is exact wherever a minimiser over ``S`` satisfies every other constraint
    (certificate checked to ``tol``); otherwise the caller solves the LP (rows empty although bounded by 0 here
    are found when the active set stalls on them, and relaxed then).
    """
    n, m, K = A.shape
    hard = ~soft
    if int(soft.sum()) != 1:  # a bound only (the LP decides); ordinal rows (min ≤ 0 = b on a box) are skipped
        rows = ~chain_row if chain_row is not None else torch.ones_like(soft)
        if not bool(rows.any()):
            return A.new_zeros(n), torch.zeros(n, dtype=torch.bool, device=A.device)
        w = _argmin_linear(A[:, rows], lo, hi)
        t = ((A[:, rows] * w).sum(-1) - b[:, rows]).amax(-1).clamp_min(0)
        return t, torch.zeros(n, dtype=torch.bool, device=A.device)
    r = int(soft.nonzero()[0, 0])
    a = A[:, r]
    t = a.new_full((n,), -math.inf)
    exact = torch.zeros(n, dtype=torch.bool, device=A.device)
    if chain is not None:  # first: over the ordered simplex (usually certified, and cheaper than the greedy fill)
        perm, links = chain
        t, x_c = _argmin_over_chain(a.gather(-1, perm), links)
        t = t - b[:, r]
        w_c = torch.empty_like(x_c).scatter_(-1, perm, x_c)
        exact = ((lo - w_c).amax(-1) <= tol) & ((w_c - hi).amax(-1) <= tol)
        other = hard & ~chain_row if chain_row is not None else hard
        if bool(other.any()):
            exact &= _holds(A[:, other], b[:, other], w_c, tol)
    rest = (~exact).nonzero()[:, 0]
    if rest.numel():  # over box∩Δ where the chain bound is not certified
        A, b, a = A[rest], b[rest], a[rest]
        w_box = _argmin_linear(a[:, None, :], lo[rest], hi[rest])[:, 0]
        t = t.index_put((rest,), torch.maximum(t[rest], (a * w_box).sum(-1) - b[:, r]))
        exact = exact.index_put((rest,), _holds(A[:, hard], b[:, hard], w_box, tol))
    return t.clamp_min(0), exact


def _relax_rows_lp(lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, soft: Tensor) -> tuple[Tensor, Tensor]:
    """Least uniform relaxation of the soft rows, per row of the batch, all in one scipy HiGHS LP (rare path,
    CPU): returns ``(t [n] ≥ 0, relaxed b [n, m])``; see :func:`solvers.diagnosis.least_uniform_relaxation`."""
    from solvers.diagnosis import least_uniform_relaxation

    t, rows = least_uniform_relaxation(*(x.detach().cpu().double().numpy() for x in (lo, hi, A, b)),
                                       hard=(~soft).cpu().numpy())
    t = torch.as_tensor(t, dtype=lo.dtype, device=lo.device)
    # HiGHS returns t* up to round-off (seen 1e-13 below it): padded by a few ulps of the row scale, so that the
    # relaxed set is not empty by that much (the active set would stall on it)
    scale = torch.maximum(A.abs().flatten(1).amax(-1), b.abs().amax(-1)).clamp_min(1)
    t = torch.where(t > 0, t + 64 * torch.finfo(torch.float64).eps * scale, t).clamp_min(0)
    return t, b + t[:, None] * torch.as_tensor(rows, device=b.device).to(b.dtype)


# ---------------------------------------------------------------------------------------------- rows: active set
def _verify(v: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, x: Tensor,
            mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """KKT parts of ``x`` with row multipliers ``μ`` (batch ``[n, ...]``, ``m ≥ 1``): ``(slack b − A x [n, m],
    bound and row violation [n], stationarity [n])``, the stationarity error
    ``‖P_box∩Δ(v − Aᵀμ) − x‖∞ / max(1, ‖v‖∞, ‖Aᵀμ‖∞)`` relative to the size of the shifted point (multipliers are
    large on thin, e.g. relaxed, sets)."""
    slack = b - (A * x[:, None, :]).sum(-1)
    primal = torch.maximum(torch.maximum(lo - x, x - hi).amax(-1), (-slack).amax(-1))
    shift = (mu[..., None] * A).sum(-2)
    st = (_euclid_box_simplex(v - shift, lo, hi) - x).abs().amax(-1)
    return slack, primal, st / torch.maximum(v.abs().amax(-1), shift.abs().amax(-1)).clamp_min(1)


def _certified_on_chain(lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, x: Tensor, mu: Tensor, perm: Tensor,
                        links: Tensor, start: int, tol: float) -> Tensor:
    """Rows where ``x = P_C(v − λ a_r)`` (a closed form on ``C`` = the ordered simplex of ``(perm, links)``, with
    ``μ`` holding ``λ ≥ 0`` at row ``r`` and the chain multipliers) is certified the projection onto the full set:
    the chain rows of ``A`` are exactly those of ``C`` with ``b = 0`` (so the set lies inside ``C``), ``x`` satisfies
    the bounds, ``Σx = 1`` and every row, ``μ ≥ 0`` and ``min(μ, slack) = 0`` (all to ``tol``). Then ``x`` is the
    KKT point of the full problem: stationarity holds by construction, every other constraint is inactive."""
    K = A.shape[-1]
    rows = A[:, start:start + K - 1]  # row k must be e_{π_{k+1}} − e_{π_k} (0 where unlinked), with b = 0
    link = links.to(A.dtype)
    chain_ok = ((rows.gather(-1, perm[:, 1:, None])[..., 0] == link).all(-1)
                & (rows.gather(-1, perm[:, :-1, None])[..., 0] == -link).all(-1)
                & (rows.abs().sum(-1) == 2 * link).all(-1) & (b[:, start:start + K - 1] == 0).all(-1))
    slack = b - (A * x[:, None, :]).sum(-1)
    primal = torch.maximum(torch.maximum(lo - x, x - hi).amax(-1), (-slack).amax(-1))
    return (chain_ok & (primal <= tol) & ((x.sum(-1) - 1).abs() <= tol) & (mu >= 0).all(-1)
            & (torch.minimum(mu, slack).abs().amax(-1) <= tol))


def _solve_rows(v: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, tol: float, max_iter: int,
                sel: Tensor, w: Tensor, u: Tensor,
                start: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Goldfarb–Idnani active-set method on the rows ``sel`` that the box∩simplex projection ``w = clamp(u)``
    leaves violating ``A w ≤ b``, verified by stationarity ``w = P_box∩Δ(v − Aᵀμ)``. ``start = (x0, u0, μ0)``
    (rows of ``sel``) warm-starts it (see :func:`~solvers.active_set.solve_active_set`); default ``(w, u, 0)``.

    Returns ``(w, μ [N, m], iterations [N], converged [N], stationarity residual [N])``; the residual
    ``‖P_box∩Δ(v − Aᵀμ) − w‖∞ / max(1, ‖v‖∞, ‖Aᵀμ‖∞)`` is 0 for rows feasible at ``w``.
    """
    N, m, K = A.shape
    mu = v.new_zeros(N, m)
    it = torch.zeros(N, dtype=torch.long, device=v.device)
    conv = torch.ones(N, dtype=torch.bool, device=v.device)
    stat = v.new_zeros(N)
    if sel.numel() == 0:
        return w, mu, it, conv, stat
    v_s, lo_s, hi_s, A_s = v[sel], lo[sel], hi[sel], A[sel]
    x0, u0, mu0 = start if start is not None else (w[sel], u[sel], None)
    res = solve_active_set(lo_s, hi_s, A_s, b[sel], x0, u0, max_iter, feas_tol=1e-2 * tol, round_off=10 * tol,
                           mu0=mu0)
    # verification in float64 (the solver's precision): primal feasibility (with Σx = 1), then stationarity
    x64 = res.x
    _, primal, st = _verify(*(t.double() for t in (v_s, lo_s, hi_s, A_s, b[sel])), x64, res.mu)
    primal = torch.maximum(primal, (x64.sum(-1) - 1).abs()).to(v.dtype)
    st = st.to(v.dtype)
    x = x64.to(v.dtype).clamp(lo_s, hi_s)
    w, mu, it = w.index_put((sel,), x), mu.index_put((sel,), res.mu.to(v.dtype)), it.index_put((sel,), res.iterations)
    conv = conv.index_put((sel,), res.converged & (st <= 10 * tol) & (primal <= 10 * tol))
    stat = stat.index_put((sel,), st)
    return w, mu, it, conv, stat


def _chain_point(y: Tensor, perm: Tensor, links: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``P_C(y) = max(iso_π(y) − τ, 0)`` onto ``C = {Σw = 1, w ≥ 0, w_{π_1} ≥ … ≥ w_{π_K}}`` (linked pairs only):
    returns ``(x [n, K], u = iso(y) − τ [n, K], μ [n, K−1], same [n, K−1])`` with the isotonic multipliers and
    blocks along ``π``."""
    iso_p, mu, same = isotonic_decreasing(y.gather(-1, perm), links)
    iso = torch.empty_like(iso_p).scatter_(-1, perm, iso_p)
    x, u = _euclid_box_simplex_u(iso, torch.zeros_like(iso), torch.ones_like(iso))
    return x, u, mu, same


def _chain_halfspace(v: Tensor, perm: Tensor, links: Tensor, a: Tensor, beta: Tensor, tol: float,
                     first: tuple[Tensor, Tensor, Tensor], steps: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """λ ≥ 0 with ``g(λ) = a·P_C(v − λa) − β = 0`` (``g`` nonincreasing, piecewise linear, ``g(0) > 0``) by Newton
    (exact once inside the root's linear piece) safeguarded by a bracket (Illinois regula falsi inside it, doubling
    before it closes); slope ``−(Σ_F ā² − |F| mean_F(ā)²)``, ``ā`` = block means of ``a`` on the free coordinates
    ``F``. ``first`` = ``(x, μ, same)`` of :func:`_chain_point` at λ = 0. Rows leave the loop once ``|g|`` is at round-off.
    Returns ``(x, μ_chain, λ)`` at the last λ of each row (the caller verifies)."""
    n = v.shape[0]
    x_out, mu_out, lam_out = first[0].clone(), first[1].clone(), v.new_zeros(n)
    rows = torch.arange(n, device=v.device)
    lam, lo, hi = v.new_zeros(n), v.new_zeros(n), v.new_full((n,), math.inf)
    g_lo, g_hi = v.new_zeros(n), v.new_zeros(n)
    prev = torch.ones(n, dtype=torch.bool, device=v.device)
    a_p = a.gather(-1, perm)
    flat = 1e-9 * a_p.square().sum(-1)  # |slope| below this: g is flat here (Newton undefined)
    x, mu, same = first
    for k in range(steps + 1):
        if k:
            x, _, mu, same = _chain_point(v - lam[:, None] * a, perm, links)
        g = (a * x).sum(-1) - beta
        done = (g.abs() <= 1e-3 * tol) | (k == steps)
        if bool(done.any()):
            idx = rows[done]
            x_out[idx], mu_out[idx], lam_out[idx] = x[done], mu[done], lam[done]
            keep = ~done
            if not bool(keep.any()):
                break
            rows, v, perm, links, a, beta, a_p, flat = (t[keep] for t in (rows, v, perm, links, a, beta, a_p, flat))
            x, same, g, lam, lo, hi, g_lo, g_hi, prev = (t[keep] for t in (x, same, g, lam, lo, hi, g_lo, g_hi, prev))
        above = g > 0
        stale = (above == prev) & (k > 0)  # the same end moved twice: halve the other end's value (Illinois)
        g_lo, g_hi = torch.where(stale & ~above, 0.5 * g_lo, g_lo), torch.where(stale & above, 0.5 * g_hi, g_hi)
        lo, g_lo = torch.where(above, lam, lo), torch.where(above, g, g_lo)
        hi, g_hi = torch.where(above, hi, lam), torch.where(above, g_hi, g)
        prev = above
        a_bar = block_means(a_p, same)
        free = (x.gather(-1, perm) > 0).to(v.dtype)
        cnt = free.sum(-1).clamp_min(1)
        slope = -((a_bar.square() * free).sum(-1) - (a_bar * free).sum(-1).square() / cnt)
        newton = lam - g / torch.where(slope < -flat, slope, -math.inf)
        secant = lo + g_lo * (hi - lo) / torch.where(g_lo > g_hi, g_lo - g_hi, math.inf)
        inside = (newton > lo) & (newton < hi) & (newton != lam)
        fallback = torch.where(torch.isinf(hi), 2 * lo + 1, torch.where(secant > lo, secant, 0.5 * (lo + hi)))
        lam = torch.where(inside, newton, fallback)
    return x_out, mu_out, lam_out


def _argmin_over_chain(a: Tensor, links: Tensor) -> tuple[Tensor, Tensor]:
    """``min_{x∈C} a·x`` and a minimiser, for ``a [n, K]`` in chain order: the vertices of ``C`` are the uniform
    distributions on prefixes of a segment, so the least prefix mean of ``a`` and the uniform vertex on it."""
    K = a.shape[-1]
    pos = torch.arange(K, device=a.device).expand_as(a)
    starts = torch.cat([torch.ones_like(links[:, :1]), ~links], dim=-1)
    first = torch.where(starts, pos, 0).cummax(-1).values  # start of each position's segment
    cs = torch.cat([a.new_zeros(a.shape[0], 1), a.cumsum(-1)], dim=-1)
    value, end = ((cs[:, 1:] - cs.gather(-1, first)) / (pos - first + 1)).min(-1)
    begin = first.gather(-1, end[:, None])
    on = (pos >= begin) & (pos <= end[:, None])
    return value, on.to(a.dtype) / (end[:, None] - begin + 1).to(a.dtype)


def _chain_rows(v: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, chain: tuple[Tensor, Tensor], start: int,
                sel: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Superset fast path on the rows ``sel``: project onto ``C = {Σw = 1, w ≥ 0, w_{π_1} ≥ … ≥ w_{π_K}}``
    (``chain = (π, links)`` of the rows ``sel`` from :func:`_chain_of`, rows ``start … start+K−2`` of ``A``) in
    closed form ``w = max(iso_π(v) − τ, 0)``; where ``w`` lies in the full set it is its projection (the set is
    inside ``C``). Where it violates one other row ``r`` (the worst), ``C ∩ {a_r·w ≤ b_r}`` is tried next (the row
    is then active): for ``K ≤ _ENUM_MAX_K`` and a fully linked chain in closed form over all block structures
    (:func:`solvers.ordered.project_ordered_halfspace`), above it as ``w = P_C(v − λ a_r)`` with the scalar ``λ`` of
    :func:`_chain_halfspace`.

    All of it runs in float64 at its tolerance (exact for the rounded data of any dtype). Returns ``(done,
    w [d, K], μ [d, m], stationarity residual [d] (0: exact by construction), rest, warm)``: the rows of ``sel``
    accepted (certified by :func:`_certified_on_chain`), the others, and for those a warm start of the active-set
    method ``(x0, u0, μ0 [r, m], valid [r])`` from the chain point (:func:`_warm_start`).
    """
    n, K, m = sel.numel(), v.shape[-1], A.shape[-2]
    v_s, lo_s, hi_s, A_s, b_s = (t[sel].double() for t in (v, lo, hi, A, b))
    tol = _tolerance(torch.float64)
    perm, links = chain
    x0, u0, mu_chain, same = _chain_point(v_s, perm, links)
    x = x0
    mu = v_s.new_zeros(n, m)
    mu[:, start:start + K - 1] = mu_chain
    mu0 = mu.clone()
    other = torch.ones(m, dtype=torch.bool, device=v.device)
    other[start:start + K - 1] = False
    if bool(other.any()):
        worst, r = torch.where(other, (A_s * x[:, None, :]).sum(-1) - b_s, -math.inf).max(-1)
        a_r, beta = A_s.gather(1, r[:, None, None].expand(n, 1, K))[:, 0], b_s.gather(1, r[:, None])[:, 0]
        if K <= _ENUM_MAX_K:  # every block structure at once (fully linked chains)
            idx = ((worst > tol) & links.all(-1)).nonzero()[:, 0]
            if idx.numel():
                p = perm[idx]
                x_h, lam, mu_h, found = project_ordered_halfspace(v_s[idx].gather(-1, p), a_r[idx].gather(-1, p),
                                                                  beta[idx], tol)
                idx, p, x_h, lam, mu_h = idx[found], p[found], x_h[found], lam[found], mu_h[found]
                x_h = torch.empty_like(x_h).scatter_(-1, p, x_h)
        else:
            in_box = ((lo_s - x).amax(-1) <= tol) & ((x - hi_s).amax(-1) <= tol)
            reachable = _argmin_over_chain(a_r.gather(-1, perm), links)[0] <= beta
            idx = ((worst > tol) & in_box & reachable).nonzero()[:, 0]
            if idx.numel():
                x_h, mu_h, lam = _chain_halfspace(v_s[idx], perm[idx], links[idx], a_r[idx], beta[idx], tol,
                                                  (x[idx], mu_chain[idx], same[idx]))
        if idx.numel():
            x = x.index_put((idx,), x_h)
            mu_h_full = torch.zeros_like(mu[idx])
            mu_h_full[torch.arange(idx.numel(), device=v.device), r[idx]] = lam
            mu_h_full[:, start:start + K - 1] = mu_h
            mu = mu.index_put((idx,), mu_h_full)
    ok = _certified_on_chain(lo_s, hi_s, A_s, b_s, x, mu, perm, links, start, tol)
    st = torch.zeros_like(x[:, 0])  # exact by construction: x = P_C(v − λ a_r) in closed form
    rest = ~ok
    x = x.to(v.dtype).clamp(lo[sel], hi[sel])
    return sel[ok], x[ok], mu[ok].to(v.dtype), st[ok].to(v.dtype), sel[rest], \
        _warm_start(x0[rest], u0[rest], mu0[rest], perm[rest], links[rest], lo_s[rest], hi_s[rest], start, tol)


def _warm_start(x: Tensor, u: Tensor, mu: Tensor, perm: Tensor, links: Tensor, lo: Tensor, hi: Tensor, start: int,
                tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chain point ``x = max(u, 0)`` as a start of the active-set method: ``(x, u', μ' [n, m], valid [n])``.

    Its active constraints must be independent, but in a zero tail (positions ``p…K`` along the chain) the chain
    rows and every lower bound are active together. The tail is pinned instead by its chain rows and the last
    bound alone: with the isotonic stationarity, the tail's multipliers become ``μ'_k = μ_k − Σ_{l=p}^{k} u_l ≥ μ_k``
    and ``ν_K = −Σ_{l=p}^{K} u_l`` (``u'_K = −ν_K``; ``u'_l = 0`` on the other tail coordinates: no bound active).
    Valid where ``x`` is the box-clamp of ``u`` and the chain links every pair (else only without active chain
    rows between zeros)."""
    K = x.shape[-1]
    u_p = u.gather(-1, perm)
    tail = x.gather(-1, perm) <= 0
    joined = tail[:, 1:] & tail[:, :-1]  # chain pairs inside the zero tail
    run = torch.where(tail, u_p, 0.0).cumsum(-1)  # Σ_{l=p}^{k} u_l (zero before the tail)
    mu_c = mu[:, start:start + K - 1]
    linked = links.all(-1, keepdim=True)
    mu_c = torch.where(joined & linked, mu_c - run[:, :-1], mu_c)
    last = tail[:, -1:] & linked
    u_new = torch.where(tail & linked, 0.0, u_p)
    u_new[:, -1:] = torch.where(last, run[:, -1:], u_p[:, -1:])
    mu = mu.clone()
    mu[:, start:start + K - 1] = mu_c
    valid = ((x - u.clamp(lo, hi)).abs().amax(-1) <= tol) & (linked[:, 0] | ~((mu_c > 0) & joined).any(-1))
    return x, torch.empty_like(u_new).scatter_(-1, perm, u_new), mu, valid


def _violated(w: Tensor, A: Tensor, b: Tensor, tol: float) -> Tensor:
    """Indices of the rows with max_r (a_r·w − b_r) > tol."""
    return (~_holds(A, b, w, tol)).nonzero()[:, 0]


def _chain_of(fset: FeasibleSet, batch: torch.Size, A: Tensor, sel: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(perm [n, K], links [n, K−1])`` of the rows ``sel`` when ``fset`` has an ordinal chain (tied pairs, zero
    rows, unlink it), else ``None``."""
    if fset.chain is None:
        return None
    K, start = fset.K, fset.chain_start
    perm = fset.chain.expand(*batch, K).reshape(-1, K)[sel]
    return perm, A[sel, start:start + K - 1].abs().amax(-1) > 0


# ---------------------------------------------------------------------------------------------- autograd
def _active_rows(fset: FeasibleSet, batch: torch.Size, A: Tensor, active: Tensor) -> tuple[Tensor, ...]:
    """What the backward needs of the active rows ``active [N, m]``: ``(A·active,)``, or with an ordinal chain
    ``(the other rows · active, π [N, K], active chain rows [N, K−1])`` (the chain rows by block averaging)."""
    if fset.chain is None:
        return (A * active[..., None].to(A.dtype),)
    start, K = fset.chain_start, fset.K
    chain = slice(start, start + K - 1)
    perm, links = _chain_of(fset, batch, A, slice(None))
    other = torch.cat([A[:, :start], A[:, start + K - 1:]], dim=1)
    on = torch.cat([active[:, :start], active[:, start + K - 1:]], dim=1)
    return other * on[..., None].to(A.dtype), perm, links & active[:, chain]


class _EuclidFn(torch.autograd.Function):
    """Identity forward on the solved ``w``; backward = projector onto the null space of the active
    equalities (Σw = 1, active rows) restricted to the free coordinates (implicit active-set Jacobian). With an
    ordinal chain (``chain = (π, active chain rows)``), the chain rows are taken by block averaging instead of the
    Gram solve: ``O(K)`` per row instead of ``O(K³)``."""

    @staticmethod
    def forward(ctx, v: Tensor, w: Tensor, free: Tensor, Aact: Tensor, perm: Tensor | None = None,
                links: Tensor | None = None) -> Tensor:  # noqa: D401
        ctx.save_for_backward(free, Aact, perm, links)
        return w.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        free, Aact, perm, links = ctx.saved_tensors
        F = free.to(g.dtype)
        if perm is not None:  # d constant on each block of active chain rows, 0 on a block touching a bound
            blocks = _ChainBlocks(perm, links, F)
            rows = torch.cat([Aact.new_ones(len(Aact), 1, Aact.shape[-1]), Aact], dim=1)  # Σw = 1, other active rows
            return _orthogonal_to(blocks.project(g), blocks.project(rows)), None, None, None, None, None
        gF = g * F
        n = F.sum(-1, keepdim=True).clamp_min(1)
        gF = F * (gF - gF.sum(-1, keepdim=True) / n)  # ⊥ 1_F
        if Aact.shape[-2] == 0:
            return gF, None, None, None, None, None
        if Aact.shape[-2] == 1:  # one row: also ⊥ a' = (a − ā_F)_F, in closed form (no Gram solve)
            a = Aact[:, 0] * F
            a = F * (a - a.sum(-1, keepdim=True) / n)
            aa = a.square().sum(-1, keepdim=True)
            coef = (a * gF).sum(-1, keepdim=True) / torch.where(aa > 1e-12 * Aact[:, 0].square().sum(-1, keepdim=True),
                                                                 aa, math.inf)
            return gF - coef * a, None, None, None, None, None
        M = Aact * F[:, None, :]  # rows on F made ⊥ 1_F
        return _orthogonal_to(gF, F[:, None, :] * (M - M.sum(-1, keepdim=True) / n[:, None])), None, None, None, None, None


def _orthogonal_to(g: Tensor, M: Tensor) -> Tensor:
    """``g [n, K]`` minus its projection onto the span of the rows of ``M [n, r, K]``: Gram solve by Cholesky (zero
    rows: identity); rows whose pivots reveal dependent rows (ties) take the pseudo-inverse (a host synchronisation,
    in the backward only)."""
    G = M @ M.mT
    diag = G.diagonal(dim1=-2, dim2=-1)
    zero = diag <= 1e-24 * diag.amax(-1, keepdim=True).clamp_min(1e-300)
    L, info = torch.linalg.cholesky_ex(G + torch.diag_embed(zero.to(G.dtype)))
    pivots = L.diagonal(dim1=-2, dim2=-1).square()
    ok = (info == 0) & (zero | (pivots >= 1e-8 * diag)).all(-1)
    rhs = M @ g[..., None]
    y = torch.cholesky_solve(rhs, L)
    bad = (~ok).nonzero()[:, 0]
    if bad.numel():
        y = y.index_put((bad,), torch.linalg.pinv(G[bad], hermitian=True) @ rhs[bad])
    return g - (M.mT @ y)[..., 0]


class _ChainBlocks:
    """The blocks of an ordinal chain at a solution: maximal runs along ``π`` joined by active chain rows
    (``links [n, K−1]``); a block with a coordinate at a bound is fixed. :meth:`project` is the orthogonal projector
    onto ``{d : d constant on each free block, 0 on fixed ones}`` (block means)."""

    def __init__(self, perm: Tensor, links: Tensor, F: Tensor) -> None:
        n, K = F.shape
        self.perm = perm
        self.seg = torch.cat([torch.zeros_like(perm[:, :1]), (~links).long().cumsum(-1)], dim=-1)  # block along π
        bound = F.new_zeros(n, K).scatter_reduce(-1, self.seg, 1 - F.gather(-1, perm), "amax")  # 1: a fixed block
        size = F.new_zeros(n, K).scatter_add(-1, self.seg, torch.ones_like(F))
        self.weight = (1 - bound) / size.clamp_min(1)  # per block: 1/size where free, 0 where fixed

    def project(self, x: Tensor) -> Tensor:
        """Block means of ``x [n, K]`` or ``[n, r, K]`` (each row of ``x`` separately)."""
        shape = x.shape
        perm, seg, weight = (t[:, None, :].expand(shape) if x.dim() == 3 else t
                             for t in (self.perm, self.seg, self.weight))
        sums = torch.zeros_like(x).scatter_add(-1, seg, x.gather(-1, perm))
        return torch.zeros_like(x).scatter(-1, perm, (sums * weight).gather(-1, seg))


class _KLFn(torch.autograd.Function):
    """Backward of w_F = v_F·c, c = (1 − Σ_{fixed} w)/Σ_F v: ∂L/∂v_F = c (g_F − Σ_F g w / (1 − Σ_fixed w))."""

    @staticmethod
    def forward(ctx, v: Tensor, w: Tensor, free: Tensor) -> Tensor:
        ctx.save_for_backward(v, w, free)
        return w.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        v, w, free = ctx.saved_tensors
        F = free.to(g.dtype)
        mass = (w * F).sum(-1, keepdim=True)
        c = mass / (v * F).sum(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        inner = (g * w * F).sum(-1, keepdim=True) / mass.clamp_min(torch.finfo(v.dtype).tiny)
        return F * c * (g - inner), None, None


# ---------------------------------------------------------------------------------------------- public entry
def _validate(v: Tensor, fset: FeasibleSet, metric: str, allow_rows_kl: bool = False) -> FeasibleSet:
    if not isinstance(fset, FeasibleSet):
        raise TypeError(f"fset must be a solvers.FeasibleSet, got {type(fset).__name__}")
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"v must be floating point, got {v.dtype}")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if v.dim() < 1 or v.shape[-1] != fset.K:
        raise ValueError(f"v must have shape [..., K={fset.K}], got {tuple(v.shape)}")
    # eagerly a finite sum first (one cheap reduction; it rules out NaN and inf), the elementwise test where it is not
    finite_sum = not torch.compiler.is_compiling() and bool(torch.isfinite(v.sum()))
    if not finite_sum and not holds(torch.isfinite(v).all(), "v contains NaN or inf"):
        raise ValueError("v contains NaN or inf")
    try:
        ok = torch.broadcast_shapes(v.shape[:-1], fset.batch_shape) == v.shape[:-1]
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"fset batch shape {tuple(fset.batch_shape)} does not broadcast to v's batch shape {tuple(v.shape[:-1])}")
    if metric == "kl":
        if fset.num_rows and not allow_rows_kl:
            raise ValueError("metric='kl' supports box∩simplex sets only (fset has rows); use solvers.reference.project")
        if not holds((v > 0).all(), "v must be strictly positive probabilities for metric='kl'"):
            raise ValueError("v must be strictly positive probabilities for metric='kl'")
    if fset.dtype != v.dtype or fset.device != v.device:
        fset = fset.to(device=v.device, dtype=v.dtype)
    return fset


def project(
    v: Tensor,
    fset: FeasibleSet,
    metric: str = "euclidean",
    return_info: bool = False,
    max_iter: int | None = None,
    on_all_empty: str = "raise",
) -> Tensor | tuple[Tensor, ProjectionResult]:
    """Exact batched projection of ``v[..., K]`` onto ``fset`` (same shape, dtype, device out).

    ``metric="euclidean"``: argmin ½‖w − v‖²; ``metric="kl"``: argmin KL(w‖v) for probabilities ``v > 0``
    (box∩simplex sets only). Empty rows are solved on the least-relaxed set (bounds first, then the soft rows
    by the least uniform amount; ``FeasibleSet.hard_rows`` are kept) and flagged ``RELAXED``; a set empty in
    every row raises :class:`~solvers.InfeasibleError` unless ``on_all_empty="relax"`` (callers that handle
    relaxed rows themselves). Differentiable in ``v``. float16/bfloat16 are solved in float32 and cast back.
    Box∩simplex with one row (no chain) takes the fixed-shape path of :mod:`solvers.parametric` first; the rows it
    leaves uncertified get its retry steps when they are many, its exact bracketing search when they are few, and
    only what is still left reaches the general path (host synchronisations: reading those counts). ``max_iter``
    bounds the active-set steps per row (default ``4·(2K + m + 1)``); rows beyond it get the cvxpy reference
    (``MAX_ITER``). Inside ``torch.compile`` (box∩simplex with at most two rows and no chain, or with its chain and at
    most one other row; Euclidean) it runs without a host synchronisation or a data-dependent shape: see
    :func:`_solve_in_graph` (rows it cannot certify are flagged ``NUMERICAL``; data checks are device-side asserts).
    """
    if isinstance(v, Tensor) and v.dtype in (torch.float16, torch.bfloat16):  # half precision cannot meet the
        out = project(v.float(), fset, metric, return_info, max_iter, on_all_empty)  # tolerance: solved in float32
        if not return_info:
            return out.to(v.dtype)
        return out[0].to(v.dtype), out[1]
    fset = _validate(v, fset, metric)
    if on_all_empty not in ("raise", "relax"):
        raise ValueError(f"on_all_empty must be 'raise' or 'relax', got {on_all_empty!r}")
    check_empty = on_all_empty == "raise"
    shape, K, m = v.shape, fset.K, fset.num_rows
    batch = shape[:-1]
    N = math.prod(batch)
    lo, hi = fset.lower.expand(*batch, K).reshape(N, K), fset.upper.expand(*batch, K).reshape(N, K)
    A, b = fset.A.expand(*batch, m, K).reshape(N, m, K), fset.b.expand(*batch, m).reshape(N, m)
    vf = v.detach().reshape(N, K)
    tol = _tolerance(v.dtype)
    differentiate = v.requires_grad and torch.is_grad_enabled()
    if max_iter is None:
        max_iter = 4 * (2 * K + m + 1)
    elif not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int or None, got {max_iter!r}")
    zero = vf.new_zeros(N)
    status = torch.zeros(N, dtype=torch.long, device=v.device)
    relax, stat = zero, zero
    it = torch.zeros(N, dtype=torch.long, device=v.device)
    info_mu = vf.new_zeros(N, m)
    if N and torch.compiler.is_compiling():  # inside a graph: fixed shapes, no host synchronisation
        w, lo, hi, b, relax, status, it, info_mu, stat = _solve_in_graph(vf, lo, hi, A, b, fset, batch, metric, tol,
                                                                         check_empty)
        if not (return_info or differentiate):
            return w.reshape(shape)
    elif N == 0:
        w = v.detach().clone()
    elif metric == "euclidean" and m == 1 and fset.chain is None:  # fixed shape, then the general path on the rest
        # in float64 (as the active set): float32 round-off moves ill-conditioned rows by far more than the tolerance
        data = tuple(t.double() for t in (vf, lo, hi, A[:, 0], b[:, 0]))
        fast = _fixed_shape(data, K)
        w, info_mu, it = fast.w, fast.mu[:, None], fast.iterations
        rest = (~fast.certified).nonzero()[:, 0]  # the host synchronisation of this path (CPU: free)
        if rest.numel() * K > _BRACKET_MAX_ELEMENTS:  # many rows left: the kernel with more steps on them first
            w, info_mu, it, rest = _retry(_fixed_shape(tuple(t[rest] for t in data), K, retry=True), rest, w,
                                          info_mu, it)
        if 0 < rest.numel() * K <= _BRACKET_MAX_ELEMENTS:  # a few: the bracketing search
            w, info_mu, it, rest = _retry(bracket_box_halfspace(*(t[rest] for t in data), tol=_tolerance(torch.float64)),
                                          rest, w, info_mu, it)
        w, info_mu = w.to(v.dtype), info_mu.to(v.dtype)  # (w is a clamp into [lo, hi]: its cast stays inside)
        if not (rest.numel() or return_info or differentiate):
            return w.reshape(shape)  # every row carries its kernel certificate (KKT residual ≤ tol): done
        if rest.numel():
            w_r, lo_r, hi_r, b_r, relax_r, status_r, it_r, mu_r, stat_r = _solve_general(
                vf[rest], lo[rest], hi[rest], A[rest], b[rest], fset, batch, metric, tol, max_iter, False)
            w, info_mu, it = w.index_put((rest,), w_r), info_mu.index_put((rest,), mu_r), it.index_put((rest,), it_r)
            lo, hi, b = lo.index_put((rest,), lo_r), hi.index_put((rest,), hi_r), b.index_put((rest,), b_r)
            relax, status = relax.index_put((rest,), relax_r), status.index_put((rest,), status_r)
            stat = stat.index_put((rest,), stat_r)
            _raise_if_all_empty(relax, tol, fset, batch, check_empty)
    else:
        w, lo, hi, b, relax, status, it, info_mu, stat = _solve_general(vf, lo, hi, A, b, fset, batch, metric, tol,
                                                                        max_iter, check_empty)
    if N:
        status = torch.where((relax > tol) & (status == int(Status.OPTIMAL)), int(Status.RELAXED), status)
    slack = 64 * torch.finfo(w.dtype).eps  # at a bound up to round-off (a chain block's value can meet a bound of
    active_lower = w <= lo + slack * (1 + lo.abs())  # one member within 1e-16): fixed for the gradient too
    active_upper = w >= hi - slack * (1 + hi.abs())
    free = ~(active_lower | active_upper)
    active = info_mu > 0
    kkt = torch.maximum((w.sum(-1) - 1).abs(), stat)
    if m:
        kkt = torch.maximum(kkt, torch.minimum(info_mu, b - (A * w[:, None, :]).sum(-1)).abs().amax(-1))
    bad = ~(kkt <= 10 * tol) & (status != int(Status.MAX_ITER))
    status = torch.where(bad, int(Status.NUMERICAL), status)
    if not torch.compiler.is_compiling() and bool(bad.any()):
        logger.warning("project: %d row(s) failed KKT verification (tol %.1e)", int(bad.sum()), 10 * tol)
    if differentiate:
        if metric == "kl":
            w = _KLFn.apply(v.reshape(N, K), w, free)
        else:
            w = _EuclidFn.apply(v.reshape(N, K), w, free, *_active_rows(fset, batch, A, active))
    out = w.reshape(shape)
    if not return_info:
        return out
    # success and message are read from status (a synchronisation): inside a graph, when the caller reads them
    lazy = torch.compiler.is_compiling()
    info = ProjectionResult(
        success=None if lazy else projection_success(status), status=status.reshape(batch),
        message=None if lazy else projection_message(status), kkt_residual=kkt.reshape(batch),
        active=active.reshape(*batch, m), active_lower=active_lower.reshape(shape), active_upper=active_upper.reshape(shape),
        iterations=it.reshape(batch), relaxation=relax.reshape(batch), multipliers=info_mu.reshape(*batch, m),
    )
    return out, info


def _fixed_shape(data: tuple[Tensor, ...], K: int, retry: bool = False) -> FixedShapeResult:
    """:func:`~solvers.parametric.project_box_halfspace` on ``data = (v, lo, hi, a, b)`` (float64) with the steps
    of ``_FIXED_STEPS`` for ``K`` (``retry``: ``_FIXED_STEPS_RETRY``); eagerly the batch shrinks after
    ``_SHRINK_AFTER`` Newton steps."""
    steps = _FIXED_STEPS_RETRY if retry else next(st for k_max, st in _FIXED_STEPS if K <= k_max)
    shrink = None if retry or torch.compiler.is_compiling() else _SHRINK_AFTER
    return project_box_halfspace(*data, tol=_tolerance(torch.float64), newton_steps=steps[0], path_steps=steps[1],
                                 newton_polish=steps[2], shrink_after=shrink)


def _retry(again: FixedShapeResult, rest: Tensor, w: Tensor, mu: Tensor,
           it: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows ``rest`` solved again (``again``) written into ``(w, μ [N, 1], iterations)``; returns those and the
    rows still uncertified."""
    w, mu = w.index_put((rest,), again.w), mu.index_put((rest,), again.mu[:, None])
    return w, mu, it.index_put((rest,), it[rest] + again.iterations), rest[~again.certified]


def _solve_in_graph(vf: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, fset: FeasibleSet, batch: torch.Size,
                    metric: str, tol: float, check_empty: bool) -> tuple[Tensor, ...]:
    """:func:`project` inside a ``torch.compile`` graph, for box∩simplex with at most two rows (no chain), or with its
    ordinal chain and at most one other row (Euclidean): fixed shapes, no host synchronisation. The box is relaxed
    where ``Σ lower > 1`` or ``Σ upper < 1`` (both closed forms of :func:`_relax_box` on every row); a soft row by the least ``t = max(0,
    min_{w∈box∩Δ} a·w − b)`` (the greedy fill of :func:`_argmin_linear`, exact with one row: the relaxed set is the
    face of box∩Δ minimising ``a·w``), so emptiness is decided without a synchronisation (``RELAXED``,
    ``relaxation = t``). Without a row, ``w`` is the exact breakpoint search; with one, the fixed-shape kernel with
    the steps of ``_FIXED_STEPS``, and with those of ``_FIXED_STEPS_RETRY`` on every row, taken where the first is
    uncertified; with two rows, the fixed-shape kernel of :mod:`solvers.two_rows`; with the chain, the fixed-shape
    chain kernel (:mod:`solvers.chain_box`), inside a safeguarded Newton search on the other row's multiplier where
    there is one (``_CHAIN_ROW_STEPS``). Rows still uncertified (with two rows or a chain: also a set the box
    leaves empty, whose least relaxation needs an LP) cannot reach the active set inside a graph: they keep the
    kernel's best point and are flagged ``NUMERICAL`` (their kernel KKT residual is the stationarity part); count
    them after the graph from ``ProjectionResult.status``. A set empty in every row (``check_empty``) fails a
    device-side assert. Returns what :func:`_solve_general` returns."""
    chain_only = fset.chain is not None and fset.chain_start == 0 and A.shape[-2] == fset.K - 1
    chain_row = fset.chain is not None and fset.chain_start in (0, 1) and A.shape[-2] == fset.K  # + one other row
    if metric != "euclidean" or (A.shape[-2] > 2 or fset.chain is not None) and not (chain_only or chain_row):
        raise NotImplementedError("inside torch.compile, solvers.project solves box∩simplex with at most two rows and "
                                  "no chain, or with its chain and at most one other row, metric='euclidean'; call it "
                                  "outside the compiled region for this set")
    N, K = vf.shape
    status = torch.zeros(N, dtype=torch.long, device=vf.device)
    lo, hi, relax = _relax_box(lo, hi)
    if chain_only:
        perm, links = _chain_of(fset, batch, A, slice(None))
        res = project_chain_box(*(x.double() for x in (vf, lo, hi)), perm, links, tol=_tolerance(torch.float64),
                                refine=_CHAIN_REFINE)
        w, mu, it = res.w.to(vf.dtype).clamp(lo, hi), res.chain_mu.to(vf.dtype), torch.zeros_like(status)
        status = torch.where(res.certified, status, int(Status.NUMERICAL))
        stat = torch.where(res.certified, 0.0, res.kkt_residual).to(vf.dtype)
    elif chain_row:  # (an empty set is not relaxed here either: it stays uncertified)
        start, K = fset.chain_start, fset.K
        row = K - 1 if start == 0 else 0
        perm, links = _chain_of(fset, batch, A, slice(None))
        res = project_chain_box_halfspace(*(x.double() for x in (vf, lo, hi)), perm, links, A[:, row].double(),
                                          b[:, row].double(), tol=_tolerance(torch.float64), steps=_CHAIN_ROW_STEPS,
                                          refine=_CHAIN_REFINE)
        w, lam, chain_mu = res.w.to(vf.dtype).clamp(lo, hi), res.row_mu.to(vf.dtype)[:, None], res.chain_mu.to(vf.dtype)
        mu, it = torch.cat([chain_mu, lam] if start == 0 else [lam, chain_mu], dim=-1), res.iterations
        status = torch.where(res.certified, status, int(Status.NUMERICAL))
        stat = torch.where(res.certified, 0.0, res.kkt_residual).to(vf.dtype)
    elif A.shape[-2] == 2:  # (an empty set is not relaxed here: its least relaxation is an LP; it stays uncertified)
        res = project_box_two_halfspaces(*(x.double() for x in (vf, lo, hi, A, b)), tol=_tolerance(torch.float64))
        w, mu, it = res.w.to(vf.dtype).clamp(lo, hi), res.mu.to(vf.dtype), res.iterations
        status = torch.where(res.certified, status, int(Status.NUMERICAL))
        stat = torch.where(res.certified, 0.0, res.kkt_residual).to(vf.dtype)
    elif A.shape[-2] == 0:
        w, mu, it, stat = _euclid_box_simplex(vf, lo, hi), vf.new_zeros(N, 0), torch.zeros_like(status), vf.new_zeros(N)
    else:
        a = A[:, 0]
        vertex = torch.zeros_like(status, dtype=torch.bool)
        if not fset.hard_rows[0]:  # a hard row is kept: an empty row stays uncertified (NUMERICAL)
            w_min = _argmin_linear(a[:, None, :], lo, hi)[:, 0]
            t = ((a * w_min).sum(-1) - b[:, 0]).clamp_min(0)
            b, relax = b + t[:, None], torch.maximum(relax, t)
            # the relaxed set is the face argmin_{box∩Δ} a·w: the greedy point alone unless mass can move between
            # two coordinates of equal a (one above its lower bound, the other below its upper bound); then the
            # point is the projection (μ large enough puts every other coordinate at its bound)
            movable = (a[:, :, None] == a[:, None, :]) & (w_min > lo)[:, :, None] & (w_min < hi)[:, None, :]
            vertex = (t > 0) & ~(movable & ~torch.eye(K, dtype=torch.bool, device=a.device)).flatten(1).any(-1)
        data = tuple(x.double() for x in (vf, lo, hi, a, b[:, 0]))
        fast, long = _fixed_shape(data, K), _fixed_shape(data, K, retry=True)
        again = ~fast.certified
        w = torch.where(again[:, None], long.w, fast.w).to(vf.dtype).clamp(lo, hi)
        w = torch.where((vertex & again & ~long.certified)[:, None], w_min, w) if not fset.hard_rows[0] else w
        mu = torch.where(again, long.mu, fast.mu)[:, None].to(vf.dtype)
        it = fast.iterations + torch.where(again, long.iterations, 0)
        certified = fast.certified | long.certified | vertex
        status = torch.where(certified, status, int(Status.NUMERICAL))
        stat = torch.where(certified, 0.0, torch.where(again, long.kkt_residual, fast.kkt_residual)).to(vf.dtype)
    if check_empty:
        torch._assert_async(~(relax > tol).all(), "the feasible set is empty in every row (solvers.diagnose names "
                                                  "the conflict); pass on_all_empty='relax' to relax it")
    return w, lo, hi, b, relax, status, it, mu, stat


def _solve_general(vf: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, fset: FeasibleSet, batch: torch.Size,
                   metric: str, tol: float, max_iter: int, check_empty: bool) -> tuple[Tensor, ...]:
    """The general path on rows ``vf [N, K]`` of the sets ``(lo, hi, A, b)`` (``fset``/``batch`` name them for the
    diagnosis and carry the chain): box relaxation, row relaxation, chain closed forms, active set, rescue.
    Returns ``(w, lo, hi, b, relax, status, iterations, μ [N, m], stationarity residual)`` on the relaxed sets."""
    N, K = vf.shape
    m = A.shape[-2]
    zero = vf.new_zeros(N)
    status = torch.zeros(N, dtype=torch.long, device=vf.device)
    stat = zero
    it = torch.zeros(N, dtype=torch.long, device=vf.device)
    info_mu = vf.new_zeros(N, m)
    lo, hi, relax = _relax_box(lo, hi)
    _raise_if_all_empty(relax, tol, fset, batch, check_empty)
    if metric == "kl":
        w = _kl_box_simplex(vf, lo, hi)
    elif m == 0:
        w = _euclid_box_simplex_fast(vf, lo, hi)
    else:
        soft = torch.tensor([not h for h in fset.hard_rows], dtype=torch.bool, device=vf.device)
        w, u = _euclid_box_simplex_u(vf, lo, hi)
        sel = _violated(w, A, b, tol)  # most rows are feasible here: only the rest need work
        chain = _chain_of(fset, batch, A, sel) if fset.chain is not None and sel.numel() else None
        if sel.numel():  # rows are empty only if violated at w: relax those by the least uniform t
            chain_row = None
            if chain is not None:
                chain_row = torch.zeros_like(soft)
                chain_row[fset.chain_start:fset.chain_start + K - 1] = True
            hard_chain = chain if chain is not None and not bool((soft & chain_row).any()) else None
            t_row, exact = _least_relaxation(A[sel], b[sel], lo[sel], hi[sel], soft, chain_row, hard_chain, tol)
            pos = t_row > 0
            if bool((pos & ~exact).any()):
                s2 = sel[(pos & ~exact).nonzero()[:, 0]]
                t_lp, b_lp = _relax_rows_lp(lo[s2], hi[s2], A[s2], b[s2], soft)
                b = b.index_put((s2,), b_lp)
                relax = relax.index_put((s2,), torch.maximum(relax[s2], t_lp))
            if bool((pos & exact).any()):  # one soft row, t* in closed form
                s1, t1 = sel[pos & exact], t_row[pos & exact]
                b = b.index_put((s1,), b[s1] + t1[:, None] * soft.to(b.dtype))
                relax = relax.index_put((s1,), torch.maximum(relax[s1], t1))
        _raise_if_all_empty(relax, tol, fset, batch, check_empty)
        fast, start = sel[:0], None
        if chain is not None:  # closed forms on the ordinal chain; the rest is warm-started
            fast, w_fast, mu_fast, st_fast, sel, warm = _chain_rows(vf, lo, hi, A, b, chain, fset.chain_start, sel)
            w = w.index_put((fast,), w_fast)
            x0, u0, mu0, valid = warm  # the chain point is a valid start where the chain rows were not relaxed
            c0 = fset.chain_start
            valid = (valid & (b[sel, c0:c0 + K - 1] == 0).all(-1))[:, None]
            start = (torch.where(valid, x0, w[sel].double()), torch.where(valid, u0, u[sel].double()),
                     torch.where(valid, mu0, 0.0))
        w, info_mu, it, conv, stat = _solve_rows(vf, lo, hi, A, b, tol, max_iter, sel, w, u, start)
        if fast.numel():
            info_mu, stat = info_mu.index_put((fast,), mu_fast), stat.index_put((fast,), st_fast)
        if not bool(conv.all()):
            w, info_mu, it, status, relax, b, stat = _rescue(vf, lo, hi, A, b, soft, w, info_mu, it, status, relax,
                                                             conv, stat, tol, max_iter)
            _raise_if_all_empty(relax, tol, fset, batch, check_empty)
    return w, lo, hi, b, relax, status, it, info_mu, stat


def _raise_if_all_empty(relax: Tensor, tol: float, fset: FeasibleSet, batch: torch.Size, check: bool) -> None:
    """A set that is empty in every row is an error (diagnosed on the first row), if ``check``."""
    if check and bool((relax > tol).all()):
        from solvers.diagnosis import diagnose

        diag = diagnose(fset.expand(batch)[(0,) * len(batch)] if batch else fset)
        raise InfeasibleError(f"the feasible set is empty in every row; {diag.message}", diag)


def _rescue(vf, lo, hi, A, b, soft, w, mu, it, status, relax, conv, stat, tol, max_iter):
    """Rows the active-set method could not finish (jointly empty rows make it stall; otherwise round-off or
    ``max_iter``): relax by the least uniform ``t`` (LP) and re-solve, in float64 (a relaxation computed in float32
    can leave the set empty by round-off); rows still unverified get the cvxpy reference, flagged ``MAX_ITER``
    (last resort)."""
    from solvers import reference

    sel = (~conv).nonzero()[:, 0]
    v_s, lo_s, hi_s, A_s, b_s = (t[sel].double() for t in (vf, lo, hi, A, b))
    t, b_s = _relax_rows_lp(lo_s, hi_s, A_s, b_s, soft)
    b = b.index_put((sel,), b_s.to(b.dtype))
    relax = relax.index_put((sel,), torch.maximum(relax[sel], t.to(relax.dtype)))
    w2, u2 = _euclid_box_simplex_u(v_s, lo_s, hi_s)
    w2, mu2, it2, conv2, stat2 = _solve_rows(v_s, lo_s, hi_s, A_s, b_s, tol, max_iter, _violated(w2, A_s, b_s, tol),
                                             w2, u2)
    w, mu = w.index_put((sel,), w2.to(w.dtype)), mu.index_put((sel,), mu2.to(mu.dtype))
    stat = stat.index_put((sel,), stat2.to(stat.dtype))
    it = it.index_put((sel,), it[sel] + it2)
    if not bool(conv2.all()):
        bad = ~conv2
        logger.warning("project: %d row(s) not solved by the active-set method (max_iter=%d); using the cvxpy "
                       "reference for them (status MAX_ITER)", int(bad.sum()), max_iter)
        fs = FeasibleSet(lo_s[bad], hi_s[bad], A_s[bad], b_s[bad], tuple(f"row{r}" for r in range(A.shape[1])),
                         hard_rows=tuple(bool(h) for h in ~soft))
        wr, info = reference.project(v_s[bad], fs, return_info=True)
        bad = sel[bad]
        w = w.index_put((bad,), wr.to(w.dtype))
        mu = mu.index_put((bad,), info.multipliers.to(mu.dtype))
        stat = stat.index_put((bad,), torch.zeros_like(stat[bad]))
        status = status.index_put((bad,), torch.full_like(bad, int(Status.MAX_ITER)))
    return w, mu, it, status, relax, b, stat
