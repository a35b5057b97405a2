"""cvxpy oracle for :func:`solvers.project` (same semantics, one conic solve per row).

The problem ``min ½‖w − v‖²`` (or ``Σ w log w − w·log v``, i.e. KL(w‖v) up to constants on Δ) subject to
``Σ w = 1, lower ≤ w ≤ upper, A w ≤ b`` is built once per ``(K, m, metric)`` with ``Parameter``s (DPP) and
re-solved by assigning values. ``extra_constraints`` (a callable ``w ↦ list of cvxpy constraints``, e.g. an
entropy floor or an SOC ball around a prior) builds a fresh, uncached problem. Empty rows are relaxed as in
the fast path: box by the closed-form least ``t``, rows by the least uniform ``t`` (``linprog``).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import cvxpy as cp
import numpy as np
import torch
from torch import Tensor

from solvers.errors import SolverError
from solvers.results import ProjectionResult, Status
from solvers.sets import FeasibleSet

__all__ = ["project", "build_problem"]

logger = logging.getLogger(__name__)

_Built = tuple[cp.Problem, dict[str, cp.Parameter], cp.Variable, "cp.Constraint | None"]
_CACHE: dict[tuple[int, int, str], _Built] = {}
_SOLVED = {cp.OPTIMAL, cp.OPTIMAL_INACCURATE}
_DEFAULT_OPTS = {"CLARABEL": {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10}}


def build_problem(K: int, m: int, metric: str = "euclidean",
                  extra_constraints: Callable[[cp.Variable], list] | None = None) -> _Built:
    """(problem, parameters, w, row_constraint); cached per (K, m, metric) unless ``extra_constraints``."""
    key = (K, m, metric)
    if extra_constraints is None and key in _CACHE:
        return _CACHE[key]
    w = cp.Variable(K, name="w")
    params = {"v": cp.Parameter(K, name="v"), "lower": cp.Parameter(K, name="lower"), "upper": cp.Parameter(K, name="upper")}
    cons = [cp.sum(w) == 1, w >= params["lower"], w <= params["upper"]]
    row = None
    if m:
        params["A"], params["b"] = cp.Parameter((m, K), name="A"), cp.Parameter(m, name="b")
        row = params["A"] @ w <= params["b"]
        cons.append(row)
    if metric == "euclidean":
        objective = cp.Minimize(0.5 * cp.sum_squares(w - params["v"]))
    elif metric == "kl":  # params["v"] holds log v
        objective = cp.Minimize(-cp.sum(cp.entr(w)) - params["v"] @ w)
    else:
        raise ValueError(f"metric must be 'euclidean' or 'kl', got {metric!r}")
    if extra_constraints is not None:
        extra = extra_constraints(w)
        if not isinstance(extra, (list, tuple)) or not all(isinstance(c, cp.Constraint) for c in extra):
            raise TypeError("extra_constraints must return a list of cvxpy constraints")
        cons += list(extra)
    out = (cp.Problem(objective, cons), params, w, row)
    if extra_constraints is None:
        _CACHE[key] = out
    return out


def project(
    v: Tensor,
    fset: FeasibleSet,
    metric: str = "euclidean",
    solver: str = "CLARABEL",
    extra_constraints: Callable[[cp.Variable], list] | None = None,
    return_info: bool = False,
    solver_opts: dict | None = None,
) -> Tensor | tuple[Tensor, ProjectionResult]:
    """Projection of every row of ``v[..., K]`` onto ``fset`` by cvxpy (``solver`` = any installed solver name).

    Returns the result in ``v``'s dtype and device; ``return_info`` adds a :class:`ProjectionResult`
    (``iterations`` holds the solver's iteration count where reported). Not differentiable.
    """
    from solvers.projection import _relax_box, _validate

    fset = _validate(v, fset, metric, allow_rows_kl=True)
    if solver not in cp.installed_solvers():
        raise ValueError(f"solver {solver!r} is not installed; installed: {cp.installed_solvers()}")
    opts = dict(_DEFAULT_OPTS.get(solver, {}), **(solver_opts or {}))
    shape, K, m = v.shape, fset.K, fset.num_rows
    batch = shape[:-1]
    N = math.prod(batch)
    e = fset.expand(batch).to(device="cpu", dtype=torch.float64)
    lo_t, hi_t, t_box = _relax_box(e.lower.reshape(N, K), e.upper.reshape(N, K))
    lo, hi = lo_t.numpy(), hi_t.numpy()
    A, b = e.A.reshape(N, m, K).numpy(), e.b.reshape(N, m).numpy().copy()
    hard = np.array(fset.hard_rows, dtype=bool)
    vv = v.detach().reshape(N, K).to("cpu", torch.float64).numpy()
    if metric == "kl":
        vv = np.log(vv)
    prob, params, w, row = build_problem(K, m, metric, extra_constraints)
    W, MU = np.zeros((N, K)), np.zeros((N, m))
    status = np.zeros(N, dtype=np.int64)
    relax, iters = t_box.numpy().copy(), np.zeros(N, dtype=np.int64)
    for n in range(N):
        params["v"].value, params["lower"].value, params["upper"].value = vv[n], lo[n], hi[n]
        if m:
            params["A"].value, params["b"].value = A[n], b[n]
        _solve(prob, solver, opts)
        if prob.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE) and m:
            from solvers.diagnosis import least_uniform_relaxation

            t, rows = least_uniform_relaxation(lo[n:n + 1], hi[n:n + 1], A[n:n + 1], b[n:n + 1], hard)
            t = max(float(t[0]), 0.0)
            b[n] += t * rows[0]
            relax[n] = max(relax[n], t)
            params["b"].value = b[n]
            _solve(prob, solver, opts)
        if prob.status not in _SOLVED:
            if w.value is None or not np.isfinite(w.value).all():
                raise SolverError(f"cvxpy solver {solver} returned status {prob.status!r} and no finite point for "
                                  f"row {n}")
            logger.warning("reference: %s returned %r for row %d; keeping its last iterate", solver, prob.status, n)
        W[n] = w.value
        if m:
            MU[n] = np.maximum(row.dual_value, 0)
        if metric == "euclidean" and extra_constraints is None and prob.status in _SOLVED:
            W[n], MU[n] = _polish(vv[n], lo[n], hi[n], A[n], b[n], W[n], MU[n])
        iters[n] = prob.solver_stats.num_iters or 0
        status[n] = int(Status.NUMERICAL) if prob.status not in _SOLVED else int(Status.RELAXED) if relax[n] > 0 else int(Status.OPTIMAL)
    out = torch.as_tensor(W, dtype=v.dtype, device=v.device).reshape(shape)
    if not return_info:
        return out
    kkt = np.abs(W.sum(-1) - 1)
    if m:
        kkt = np.maximum(kkt, np.abs(np.minimum(MU, b - np.einsum("nmk,nk->nm", A, W))).max(-1))
    dev = dict(device=v.device)
    counts = {s.name: int((status == int(s)).sum()) for s in Status if (status == int(s)).any()}
    info = ProjectionResult(
        success=bool((status <= int(Status.RELAXED)).all()), status=torch.as_tensor(status, **dev).reshape(batch),
        message=f"cvxpy/{solver}: rows by status: {counts}",
        kkt_residual=torch.as_tensor(kkt, dtype=v.dtype, **dev).reshape(batch),
        active=torch.as_tensor(MU > 1e-8, **dev).reshape(*batch, m),
        active_lower=torch.as_tensor(W <= lo + 1e-9, **dev).reshape(shape),
        active_upper=torch.as_tensor(W >= hi - 1e-9, **dev).reshape(shape),
        iterations=torch.as_tensor(iters, **dev).reshape(batch),
        relaxation=torch.as_tensor(relax, dtype=v.dtype, **dev).reshape(batch),
        multipliers=torch.as_tensor(MU, dtype=v.dtype, **dev).reshape(*batch, m),
    )
    return out, info


def _polish(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, A: np.ndarray, b: np.ndarray, w: np.ndarray,
            mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OSQP-style polishing of an interior-point solution of ``min ½‖w − v‖²`` (which is only ~1e-9 accurate
    *relative to the objective*, so ~1e-5 in ``w`` at ``|v| ~ 1e4``): guess the active set from the solver's
    ``w`` and duals (at a few thresholds), solve the equality-constrained QP on it exactly (a KKT linear system)
    and return the first guess whose solution satisfies every KKT condition — feasibility and multiplier signs;
    that point is the optimum (convex problem). Without such a guess the solver's point is kept."""
    K, m = v.shape[0], A.shape[0]
    scale = max(1.0, float(np.abs(v).max()))
    tol = 1e-12 * scale
    for eps in (1e-9 * scale, 1e-7 * scale, 1e-7):
        at_lo = w <= lo + eps
        at_hi = (w >= hi - eps) & ~at_lo
        rows = np.nonzero(mu > eps)[0] if m else np.zeros(0, dtype=int)
        E = np.vstack([np.ones((1, K)), np.eye(K)[at_lo], np.eye(K)[at_hi], A[rows]])
        e = np.concatenate([[1.0], lo[at_lo], hi[at_hi], b[rows]])
        kkt = np.block([[np.eye(K), E.T], [E, np.zeros((E.shape[0], E.shape[0]))]])
        sol, *_ = np.linalg.lstsq(kkt, np.concatenate([v, e]), rcond=None)
        wp, lam = sol[:K], sol[K:]
        n_lo, n_hi = int(at_lo.sum()), int(at_hi.sum())
        lam_lo, lam_hi, lam_rows = lam[1:1 + n_lo], lam[1 + n_lo:1 + n_lo + n_hi], lam[1 + n_lo + n_hi:]
        feasible = (np.abs(E @ wp - e).max() <= tol and (wp >= lo - tol).all() and (wp <= hi + tol).all()
                    and (m == 0 or (A @ wp - b <= tol).all()))
        # stationarity w − v + Eᵀλ = 0 holds by construction; signs: λ ≥ 0 on ≤ (upper, rows), ≤ 0 on ≥ (lower)
        if feasible and (lam_lo <= tol).all() and (lam_hi >= -tol).all() and (lam_rows >= -tol).all():
            mu_p = np.zeros(m)
            mu_p[rows] = np.maximum(lam_rows, 0)
            return wp, mu_p
    return w, mu


def _solve(prob: cp.Problem, solver: str, opts: dict) -> None:
    """Solve with the tight default options; on failure retry once with the solver's own defaults. Cold starts
    unless ``opts`` asks for ``warm_start``: the cached problem is shared by every row, and Clarabel started from
    the previous row's point failed on valid rows (cold starts are also faster here)."""
    try:
        prob.solve(solver=solver, **{"warm_start": False, **opts})
        if prob.status in _SOLVED or not opts:
            return
    except cp.error.SolverError as exc:
        if not opts:
            raise SolverError(f"cvxpy solver {solver} failed: {exc}") from exc
    logger.info("reference: %s failed with options %s; retrying with its defaults", solver, opts)
    try:
        prob.solve(solver=solver, warm_start=False)
    except cp.error.SolverError as exc:
        raise SolverError(f"cvxpy solver {solver} failed: {exc}") from exc
