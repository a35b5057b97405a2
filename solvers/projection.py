"""Exact batched projection onto a :class:`~solvers.sets.FeasibleSet`.

Euclidean: ``P(v) = argmin_{w∈F} ½‖w − v‖²``; KL (box∩simplex only): ``argmin_{w∈F} Σ w log(w/v) − w + v``.

Kernels (all batched over rows ``[N, K]``, no Python loop over rows):

* box∩simplex: ``w = clamp(α + β c, lower, upper)`` with the scalar ``c`` solving ``Σ w = 1``, found exactly by
  a breakpoint search (sort the 2K breakpoints, cumulative piecewise-linear sum, linear solve on the segment).
  Euclidean: ``α = v, β = 1`` (``c = −τ``); KL: ``α = 0, β = v`` (``c = e^{−ν}``).
* rows ``A w ≤ b``: projected semismooth Newton on the m dual variables, ``w(μ) = P_box∩Δ(v − Aᵀμ)``; the dual
  is concave piecewise quadratic, so a Newton step on the identified piece is exact. Armijo backtracking with a
  projected-gradient safeguard; termination when ``max_r |min(μ_r, b_r − a_r·w)| ≤ tol`` (stationarity and the
  box∩simplex conditions hold by construction). Rows that hit ``max_iter`` are re-solved by the cvxpy reference
  and flagged ``MAX_ITER``.
* empty rows: the box is relaxed by the least ``t`` making ``Σ lower ≤ 1 ≤ Σ upper`` (closed form, a simplex
  threshold), then the halfspaces by the least uniform ``t`` with ``{A w ≤ b + t}`` non-empty:
  ``t* = min_{w∈box∩Δ} max_r (a_r·w − b_r)``; closed form (greedy fill by ascending ``a``) for one row, scipy
  ``linprog`` (HiGHS) per affected row for several. Such rows are flagged ``RELAXED`` with ``relaxation = t``.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from solvers.errors import InfeasibleError
from solvers.results import ProjectionResult, Status
from solvers.sets import FeasibleSet

__all__ = ["project"]

logger = logging.getLogger(__name__)

_METRICS = ("euclidean", "kl")
_MU_MAX = 1e9  # multipliers beyond _MU_MAX·(1 + max|v|) mean an unbounded dual (empty set)


def _tolerance(dtype: torch.dtype) -> float:
    """KKT tolerance: 1e-10 in float64, ~1e-5 in float32/16."""
    return 1e-10 if dtype == torch.float64 else 100.0 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------- box ∩ simplex
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
    slope = step.cumsum(-1)  # slope on (bp_j, bp_{j+1})
    gain = (slope[..., :-1] * bp_s.diff(dim=-1)).cumsum(-1)
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


def _euclid_box_simplex(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Euclidean projection onto {lo ≤ w ≤ hi, Σw = 1} (rows of v; projection is invariant to v + const)."""
    return _box_simplex(v - v.amax(-1, keepdim=True), None, lo, hi)[0]


def _kl_box_simplex(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """KL projection: w = clamp(v·c, lo, hi) with Σw = 1 (v > 0, rescaled by its max for range)."""
    return _box_simplex(torch.zeros_like(v), v / v.amax(-1, keepdim=True), lo, hi)[0]


# ---------------------------------------------------------------------------------------------- relaxations
def _box_relaxation(lo: Tensor, hi: Tensor) -> Tensor:
    """Least t ≥ 0 with Σ max(lo−t, 0) ≤ 1 ≤ Σ min(hi+t, 1) → [N]. Both are simplex thresholds."""
    zero, one = torch.zeros_like(lo), torch.ones_like(lo)
    t = torch.zeros_like(lo[..., 0])
    over = lo.sum(-1) > 1
    under = hi.sum(-1) < 1
    if bool(over.any()):
        t = torch.where(over, -_box_simplex(lo, None, zero, one)[1][..., 0], t)
    if bool(under.any()):
        t = torch.maximum(t, torch.where(under, _box_simplex(hi, None, zero, one)[1][..., 0], t))
    return t.clamp_min(0)


def _min_linear(a: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """min_{w ∈ box∩Δ} a_r·w for every row r (greedy fill by ascending a): a [N,m,K] → [N,m]."""
    a_s, idx = a.sort(dim=-1)
    lo_e = lo[:, None, :].expand_as(a)
    cap = (hi - lo)[:, None, :].expand_as(a).gather(-1, idx)
    room = (1 - lo.sum(-1))[:, None, None]
    before = cap.cumsum(-1) - cap
    fill = torch.minimum((room - before).clamp_min(0), cap)
    return (a * lo_e).sum(-1) + (a_s * fill).sum(-1)


def _least_row_relaxation_lp(lo: Tensor, hi: Tensor, A: Tensor, b: Tensor) -> Tensor:
    """t* = min_{w∈box∩Δ} max_r (a_r·w − b_r) per row by scipy linprog (HiGHS); rare path, CPU → [n]."""
    from solvers.diagnosis import least_uniform_relaxation

    out = [least_uniform_relaxation(lo[i].cpu().double().numpy(), hi[i].cpu().double().numpy(),
                                    A[i].cpu().double().numpy(), b[i].cpu().double().numpy()) for i in range(lo.shape[0])]
    return torch.tensor(out, dtype=lo.dtype, device=lo.device)


# ---------------------------------------------------------------------------------------------- rows: dual Newton
def _dual_eval(v: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, mu: Tensor):
    u = v - (mu[..., None] * A).sum(-2)
    w = _euclid_box_simplex(u, lo, hi)
    r = (A @ w[..., None])[..., 0] - b
    q = 0.5 * (w - v).square().sum(-1) + (mu * r).sum(-1)
    return w, r, q


def _solve_rows(v: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, tol: float, max_iter: int):
    """Projected semismooth Newton on μ ≥ 0 (m dual variables per row). Returns (w, μ, iterations, converged)."""
    N, m, K = A.shape
    dtype = v.dtype
    eye = torch.eye(m, dtype=dtype, device=v.device)
    lipschitz = A.square().sum((-1, -2)).clamp_min(1e-300)  # ‖A‖_F² ≥ ‖A‖₂²: 1/L is a safe ascent step
    delta = 1e4 * torch.finfo(dtype).eps
    w_out, mu_out = torch.empty_like(v), torch.zeros(N, m, dtype=dtype, device=v.device)
    it_out = torch.zeros(N, dtype=torch.long, device=v.device)
    conv_out = torch.zeros(N, dtype=torch.bool, device=v.device)
    rows = torch.arange(N, device=v.device)
    mu = torch.zeros(N, m, dtype=dtype, device=v.device)
    w, r, q = _dual_eval(v, lo, hi, A, b, mu)
    for k in range(max_iter + 1):
        kkt = torch.minimum(mu, -r).abs().amax(-1)
        done = kkt <= tol
        if k == max_iter:
            done = torch.ones_like(done)
        if bool(done.any()):
            sel = rows[done]
            w_out[sel], mu_out[sel], it_out[sel] = w[done], mu[done], k
            conv_out[sel] = kkt[done] <= tol
            keep = ~done
            if not bool(keep.any()):
                break
            rows, v, lo, hi, A, b, lipschitz = rows[keep], v[keep], lo[keep], hi[keep], A[keep], b[keep], lipschitz[keep]
            mu, w, r, q = mu[keep], w[keep], r[keep], q[keep]
        # generalised Hessian of −q on the working set: A_F (I − 11ᵀ/|F|) A_Fᵀ
        free = (w > lo) & (w < hi)
        Af = A * free[:, None, :].to(dtype)
        s = Af.sum(-1)
        nf = free.sum(-1).clamp_min(1).to(dtype)[:, None, None]
        H = Af @ Af.transpose(-1, -2) - s[:, :, None] * s[:, None, :] / nf
        work = ((mu > 0) | (r > 0)).to(dtype)
        H = H * work[:, :, None] * work[:, None, :] + torch.diag_embed(1 - work) + delta * (1 + H.diagonal(0, -2, -1).amax(-1))[:, None, None] * eye
        d = torch.linalg.solve(H, (r * work)[..., None])[..., 0]
        mu, w, r, q = _line_search(v, lo, hi, A, b, mu, w, r, q, d, lipschitz)
        diverged = mu.amax(-1) > _MU_MAX * (1 + v.abs().amax(-1))
        if bool(diverged.any()):  # the dual is unbounded: the row's set is (jointly) empty → rescue path
            sel = rows[diverged]
            w_out[sel], mu_out[sel], it_out[sel] = w[diverged], mu[diverged], k + 1
            keep = ~diverged
            rows, v, lo, hi, A, b, lipschitz = rows[keep], v[keep], lo[keep], hi[keep], A[keep], b[keep], lipschitz[keep]
            mu, w, r, q = mu[keep], w[keep], r[keep], q[keep]
            if rows.numel() == 0:
                break
    return w_out, mu_out, it_out, conv_out


def _solve_one_row(v: Tensor, lo: Tensor, hi: Tensor, a: Tensor, b: Tensor, tol: float, max_iter: int):
    """One row a·w ≤ b: root of the nonincreasing piecewise-linear dual gradient r(μ) = a·w(μ) − b on μ ≥ 0.

    Safeguarded Newton (exact once on the root's linear piece) inside a bracket [μ_L, μ_R] (r(μ_L) > 0 > r(μ_R)),
    secant/bisection when Newton leaves the bracket, and the safe expansion μ + 2^j r/‖a‖² before a right end
    is known (r is ‖a‖²-Lipschitz, so the root lies beyond μ + r/‖a‖²). Returns (w, μ[N,1], iterations, converged).
    """
    N, K = v.shape
    dtype = v.dtype
    w_out, mu_out = torch.empty_like(v), torch.zeros(N, dtype=dtype, device=v.device)
    it_out = torch.zeros(N, dtype=torch.long, device=v.device)
    conv_out = torch.zeros(N, dtype=torch.bool, device=v.device)
    rows = torch.arange(N, device=v.device)
    lip = a.square().sum(-1).clamp_min(torch.finfo(dtype).tiny)
    mu = torch.zeros(N, dtype=dtype, device=v.device)
    w, r, _ = _dual_eval(v, lo, hi, a[:, None, :], b[:, None], mu[:, None])
    r = r[:, 0]
    mu_l, r_l = mu.clone(), r.clone()
    mu_r, r_r = torch.full_like(mu, math.inf), torch.zeros_like(r)
    expand = torch.zeros_like(mu)
    width = torch.full_like(mu, math.inf)
    for k in range(max_iter + 1):
        done = torch.minimum(mu, -r).abs() <= tol
        if k == max_iter:
            done = torch.ones_like(done)
        if bool(done.any()):
            sel = rows[done]
            w_out[sel], mu_out[sel], it_out[sel] = w[done], mu[done], k
            conv_out[sel] = torch.minimum(mu[done], -r[done]).abs() <= tol
            keep = ~done
            if not bool(keep.any()):
                break
            rows, v, lo, hi, a, b, lip = rows[keep], v[keep], lo[keep], hi[keep], a[keep], b[keep], lip[keep]
            mu, w, r, mu_l, r_l, mu_r, r_r, expand, width = (t[keep] for t in (mu, w, r, mu_l, r_l, mu_r, r_r, expand, width))
        pos, neg = r > 0, r < 0
        mu_l, r_l = torch.where(pos, mu, mu_l), torch.where(pos, r, r_l)
        mu_r, r_r = torch.where(neg, mu, mu_r), torch.where(neg, r, r_r)
        free = ((w > lo) & (w < hi)).to(dtype)
        af = a * free
        H = af.square().sum(-1) - af.sum(-1).square() / free.sum(-1).clamp_min(1)
        flat = H <= 1e3 * torch.finfo(dtype).eps * lip
        newton = mu + r / torch.where(flat, torch.ones_like(H), H)
        bracketed = torch.isfinite(mu_r)
        inside = ~flat & (newton > mu_l) & (newton < mu_r)
        secant = mu_l + r_l * (mu_r - mu_l) / (r_l - r_r).clamp_min(torch.finfo(dtype).tiny)
        new_width = mu_r - mu_l
        slow = bracketed & (new_width > 0.5 * width)  # bracket did not halve: bisect next
        width = torch.where(bracketed, new_width, width)
        fallback = torch.where(slow, 0.5 * (mu_l + mu_r), secant)
        grow = mu_l + (2.0 ** expand) * r_l / lip
        mu = torch.where(inside, newton, torch.where(bracketed, fallback, torch.maximum(grow, newton.where(~flat, grow))))
        expand = torch.where(bracketed | inside, expand, expand + 1)
        w, r, _ = _dual_eval(v, lo, hi, a[:, None, :], b[:, None], mu[:, None])
        r = r[:, 0]
    return w_out, mu_out[:, None], it_out, conv_out


def _line_search(v, lo, hi, A, b, mu, w, r, q, d, lipschitz):
    """Projected Armijo search over α ∈ {1, 10⁻¹, …, 10⁻¹²} on μ⁺ = [μ + αd]₊ (evaluating only rows still
    pending); rows with no acceptable α take the projected-gradient step [μ + r/L]₊, which always ascends."""
    mu_n, w_n, r_n, q_n = mu.clone(), w.clone(), r.clone(), q.clone()
    pending = None  # None = every row
    alpha = 1.0
    for _ in range(13):
        sub = (lambda t: t) if pending is None else (lambda t: t[pending])
        mu_s, r_s, q_s = sub(mu), sub(r), sub(q)
        cand = (mu_s + alpha * sub(d)).clamp_min(0)
        wc, rc, qc = _dual_eval(sub(v), sub(lo), sub(hi), sub(A), sub(b), cand)
        ok = qc >= q_s + 1e-4 * (r_s * (cand - mu_s)).sum(-1) - 1e-14 * (1 + q_s.abs())
        if pending is None and bool(ok.all()):
            return cand, wc, rc, qc
        idx = torch.arange(mu.shape[0], device=mu.device) if pending is None else pending
        acc = idx[ok]
        mu_n[acc], w_n[acc], r_n[acc], q_n[acc] = cand[ok], wc[ok], rc[ok], qc[ok]
        pending = idx[~ok]
        if pending.numel() == 0:
            return mu_n, w_n, r_n, q_n
        alpha *= 0.1
    cand = (mu[pending] + r[pending] / lipschitz[pending, None]).clamp_min(0)
    wc, rc, qc = _dual_eval(v[pending], lo[pending], hi[pending], A[pending], b[pending], cand)
    mu_n[pending], w_n[pending], r_n[pending], q_n[pending] = cand, wc, rc, qc
    return mu_n, w_n, r_n, q_n


# ---------------------------------------------------------------------------------------------- autograd
class _EuclidFn(torch.autograd.Function):
    """Identity forward on the solved ``w``; backward = projector onto the null space of the active
    equalities (Σw = 1, active rows) restricted to the free coordinates (implicit active-set Jacobian)."""

    @staticmethod
    def forward(ctx, v: Tensor, w: Tensor, free: Tensor, Aact: Tensor) -> Tensor:  # noqa: D401
        ctx.save_for_backward(free, Aact)
        return w.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        free, Aact = ctx.saved_tensors
        F = free.to(g.dtype)
        gF = g * F
        if Aact.shape[-2] == 0:
            n = F.sum(-1, keepdim=True).clamp_min(1)
            return F * (gF - gF.sum(-1, keepdim=True) / n), None, None, None
        M = torch.cat([F[:, None, :], Aact * F[:, None, :]], dim=-2)  # [N, 1+m, K]
        G = M @ M.transpose(-1, -2)
        y = torch.linalg.pinv(G, hermitian=True) @ (M @ gF[..., None])
        return gF - (M.transpose(-1, -2) @ y)[..., 0], None, None, None


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
    if not bool(torch.isfinite(v).all()):
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
        if not bool((v > 0).all()):
            raise ValueError("v must be strictly positive probabilities for metric='kl'")
    if fset.dtype != v.dtype or fset.device != v.device:
        fset = fset.to(device=v.device, dtype=v.dtype)
    return fset


def project(
    v: Tensor,
    fset: FeasibleSet,
    metric: str = "euclidean",
    return_info: bool = False,
    max_iter: int = 50,
) -> Tensor | tuple[Tensor, ProjectionResult]:
    """Exact batched projection of ``v[..., K]`` onto ``fset`` (same shape, dtype, device out).

    ``metric="euclidean"``: argmin ½‖w − v‖²; ``metric="kl"``: argmin KL(w‖v) for probabilities ``v > 0``
    (box∩simplex sets only). Empty rows are solved on the least-relaxed set and flagged ``RELAXED``; a set
    empty in every row raises :class:`~solvers.InfeasibleError`. Differentiable in ``v``.
    """
    fset = _validate(v, fset, metric)
    shape, K, m = v.shape, fset.K, fset.num_rows
    batch = shape[:-1]
    N = math.prod(batch)
    e = fset.expand(batch)
    lo, hi = e.lower.reshape(N, K), e.upper.reshape(N, K)
    A, b = e.A.reshape(N, m, K), e.b.reshape(N, m)
    vf = v.detach().reshape(N, K)
    tol = _tolerance(v.dtype)
    zero = vf.new_zeros(N)
    status = torch.zeros(N, dtype=torch.long, device=v.device)
    relax = zero
    if N == 0:
        w = v.detach().clone()
        info_mu = vf.new_zeros(N, m)
        it = torch.zeros(N, dtype=torch.long, device=v.device)
    else:
        t_box = _box_relaxation(lo, hi)
        if bool((t_box > 0).any()):
            lo, hi = (lo - t_box[:, None]).clamp_min(0), (hi + t_box[:, None]).clamp_max(1)
        relax = t_box
        it = torch.zeros(N, dtype=torch.long, device=v.device)
        info_mu = vf.new_zeros(N, m)
        if m:
            t_row = (_min_linear(A, lo, hi) - b).amax(-1).clamp_min(0)
            if m > 1 and bool((t_row > 0).any()):
                sel = (t_row > 0).nonzero()[:, 0]
                t_row = t_row.index_put((sel,), _least_row_relaxation_lp(lo[sel], hi[sel], A[sel], b[sel]).clamp_min(0))
            b = b + t_row[:, None]
            relax = torch.maximum(relax, t_row)
        _raise_if_all_empty(relax, tol, e, batch)
        status = torch.where(relax > tol, int(Status.RELAXED), status)
        if metric == "kl":
            w = _kl_box_simplex(vf, lo, hi)
        elif m == 0:
            w = _euclid_box_simplex(vf, lo, hi)
        else:
            w, info_mu, it, conv = (_solve_one_row(vf, lo, hi, A[:, 0], b[:, 0], tol, max_iter) if m == 1
                                    else _solve_rows(vf, lo, hi, A, b, tol, max_iter))
            if not bool(conv.all()):
                w, info_mu, status, relax, b = _rescue(vf, lo, hi, A, b, w, info_mu, status, relax, conv, tol, max_iter)
                _raise_if_all_empty(relax, tol, e, batch)
    active_lower, active_upper = w <= lo, w >= hi
    free = ~(active_lower | active_upper)
    active = info_mu > 0
    kkt = (w.sum(-1) - 1).abs()
    if m:
        kkt = torch.maximum(kkt, torch.minimum(info_mu, -((A @ w[..., None])[..., 0] - b)).abs().amax(-1))
    bad = ~(kkt <= 10 * tol) & (status != int(Status.MAX_ITER))
    if bool(bad.any()):
        logger.warning("project: %d row(s) failed KKT verification (tol %.1e)", int(bad.sum()), 10 * tol)
        status = torch.where(bad, int(Status.NUMERICAL), status)
    if v.requires_grad and torch.is_grad_enabled():
        if metric == "kl":
            w = _KLFn.apply(v.reshape(N, K), w, free)
        else:
            w = _EuclidFn.apply(v.reshape(N, K), w, free, A * active[..., None].to(v.dtype))
    out = w.reshape(shape)
    if not return_info:
        return out
    counts = {s.name: int((status == int(s)).sum()) for s in Status if bool((status == int(s)).any())}
    success = bool((status <= int(Status.RELAXED)).all())
    message = "projection " + ("succeeded" if success else "has unverified rows") + f"; rows by status: {counts or {'OPTIMAL': 0}}"
    info = ProjectionResult(
        success=success, status=status.reshape(batch), message=message, kkt_residual=kkt.reshape(batch),
        active=active.reshape(*batch, m), active_lower=active_lower.reshape(shape), active_upper=active_upper.reshape(shape),
        iterations=it.reshape(batch), relaxation=relax.reshape(batch), multipliers=info_mu.reshape(*batch, m),
    )
    return out, info


def _raise_if_all_empty(relax: Tensor, tol: float, fset: FeasibleSet, batch: torch.Size) -> None:
    """A set that is empty in every row is an error (diagnosed on the first row)."""
    if bool((relax > tol).all()):
        from solvers.diagnosis import diagnose

        diag = diagnose(fset[(0,) * len(batch)] if batch else fset)
        raise InfeasibleError(f"the feasible set is empty in every row; {diag.message}", diag)


def _rescue(vf, lo, hi, A, b, w, mu, status, relax, conv, tol, max_iter):
    """Rows where Newton hit ``max_iter``: detect joint emptiness by LP (relax and re-solve), else fall back
    to the cvxpy reference for those rows only, flagged ``MAX_ITER``."""
    from solvers import reference

    sel = (~conv).nonzero()[:, 0]
    t = _least_row_relaxation_lp(lo[sel], hi[sel], A[sel], b[sel]).clamp_min(0)
    b = b.index_put((sel,), b[sel] + t[:, None])
    relax = relax.index_put((sel,), torch.maximum(relax[sel], t))
    if A.shape[1] == 1:
        w2, mu2, _, conv2 = _solve_one_row(vf[sel], lo[sel], hi[sel], A[sel, 0], b[sel, 0], tol, max_iter)
    else:
        w2, mu2, _, conv2 = _solve_rows(vf[sel], lo[sel], hi[sel], A[sel], b[sel], tol, max_iter)
    w, mu = w.index_put((sel,), w2), mu.index_put((sel,), mu2)
    status = status.index_put((sel,), torch.where(t > tol, int(Status.RELAXED), status[sel]))
    if not bool(conv2.all()):
        bad = sel[~conv2]
        logger.warning("project: %d row(s) hit max_iter=%d; using the cvxpy reference for them", bad.numel(), max_iter)
        fs = FeasibleSet(lo[bad], hi[bad], A[bad], b[bad], tuple(f"row{r}" for r in range(A.shape[1])))
        wr, info = reference.project(vf[bad], fs, return_info=True)
        w = w.index_put((bad,), wr)
        mu = mu.index_put((bad,), info.multipliers)
        status = status.index_put((bad,), torch.full_like(bad, int(Status.MAX_ITER)))
    return w, mu, status, relax, b
