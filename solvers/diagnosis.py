"""Feasibility diagnosis by linear programming (scipy ``linprog``, HiGHS).

* emptiness: ``{w ≥ 0 : lower ≤ w ≤ upper, A w ≤ b, Σ w = 1}`` is checked by a zero-objective LP;
* for an empty set a **minimal conflicting subset** (irreducible infeasible subset) of the named constraints
  is found by a deletion filter: drop one constraint at a time and keep it only if dropping it makes the rest
  feasible (``w ≥ 0`` is structural and always kept);
* for a feasible set the Slater margin ``s* = max s`` s.t. ``lower + s ≤ w ≤ upper − s``, ``a_r·w + s ≤ b_r``
  (non-zero rows), ``Σ w = 1`` is reported with its maximiser (``s* > 0``: a strictly interior point exists).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from solvers.errors import InfeasibleError, SolverError
from solvers.results import DiagnosisResult, Status
from solvers.sets import FeasibleSet

__all__ = ["diagnose", "require_feasible", "least_uniform_relaxation"]

logger = logging.getLogger(__name__)

_SUM = "sum(w)=1"


def _lp(c, A_ub, b_ub, A_eq, b_eq, bounds):
    """``linprog(method="highs")`` that drops an empty ``A_ub``; statuses other than 0 (optimal) and 2 (infeasible)
    raise :class:`SolverError`."""
    from scipy.optimize import linprog  # here: a spec check that needs no LP does not pay for importing scipy

    has_ub = A_ub is not None and len(A_ub) > 0
    res = linprog(c, A_ub=A_ub if has_ub else None, b_ub=b_ub if has_ub else None, A_eq=A_eq, b_eq=b_eq,
                  bounds=bounds, method="highs")
    if res.status not in (0, 2):
        raise SolverError(f"linprog(method='highs') failed with status {res.status}: {res.message}")
    return res


def least_uniform_relaxation(lo: np.ndarray, hi: np.ndarray, A: np.ndarray, b: np.ndarray,
                             hard: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per batch element n: t*_n = min max_{r soft} (a_r·w − b_r) over w ∈ box∩Δ with the hard rows kept
    (``a_h·w ≤ b_h``); negative t* means the set has slack. ``lo, hi: [n, K]``, ``A: [n, m, K]``, ``b: [n, m]``,
    ``hard: [m]`` bool (default: every row soft) → ``(t [n], relaxes [n, m] bool)``: the rows to add ``t`` to.

    All elements are solved in ONE block-diagonal HiGHS LP (variables ``(w_n, t_n)``, objective ``Σ_n t_n``,
    which the blocks minimise separately). An element whose hard rows are jointly empty with its box relaxes
    every row instead.
    """
    from scipy.sparse import coo_matrix

    lo, hi, A, b = (np.asarray(x, dtype=np.float64) for x in (lo, hi, A, b))
    n, m, K = A.shape
    hard = np.zeros(m, dtype=bool) if hard is None else np.asarray(hard, dtype=bool)
    if hard.all():  # nothing may move: relax every row instead
        hard = np.zeros(m, dtype=bool)
    if n == 0:
        return np.zeros(0), np.zeros((0, m), dtype=bool)
    V = K + 1  # variables per element: w (K), t (1)
    col = (np.arange(n)[:, None, None] * V + np.arange(K)[None, None, :]).repeat(m, axis=1)  # [n, m, K]
    row = np.broadcast_to((np.arange(n)[:, None] * m + np.arange(m)[None, :])[..., None], (n, m, K))
    soft_rows = (np.arange(n)[:, None] * m + np.nonzero(~hard)[0][None, :]).ravel()
    rows = np.concatenate([row.ravel(), soft_rows])
    cols = np.concatenate([col.ravel(), np.repeat(np.arange(n) * V + K, int((~hard).sum()))])
    vals = np.concatenate([A.ravel(), -np.ones(soft_rows.size)])
    A_ub = coo_matrix((vals, (rows, cols)), shape=(n * m, n * V)).tocsr()
    A_eq = coo_matrix((np.ones(n * K), (np.repeat(np.arange(n), K), (np.arange(n)[:, None] * V + np.arange(K)).ravel())),
                      shape=(n, n * V)).tocsr()
    c = np.zeros(n * V)
    c[K::V] = 1.0
    bounds = np.full((n, V, 2), np.nan)
    bounds[:, :K, 0], bounds[:, :K, 1] = lo, hi
    bounds[:, K, 0], bounds[:, K, 1] = -np.inf, np.inf
    from scipy.optimize import linprog

    res = linprog(c, A_ub=A_ub, b_ub=b.ravel(), A_eq=A_eq, b_eq=np.ones(n), bounds=bounds.reshape(-1, 2),
                  method="highs")
    if res.status == 2 and hard.any():  # some element's hard rows are jointly empty: find it, relax all its rows
        if n == 1:
            return least_uniform_relaxation(lo, hi, A, b, None)
        parts = [least_uniform_relaxation(lo[i:i + 1], hi[i:i + 1], A[i:i + 1], b[i:i + 1], hard) for i in range(n)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if res.status != 0:
        raise SolverError(f"least_uniform_relaxation: linprog(method='highs') status {res.status}: {res.message}")
    return res.x[K::V].copy(), np.broadcast_to(~hard, (n, m)).copy()


@dataclass(frozen=True)
class _Con:
    name: str
    kind: str  # "lower" | "upper" | "row" | "sum"
    index: int
    value: float


def _constraints(lo: np.ndarray, hi: np.ndarray, b: np.ndarray, fset: FeasibleSet) -> list[_Con]:
    cons: list[_Con] = []
    for i in range(fset.K):
        if fset.lower_names[i] or lo[i] > 0:
            cons.append(_Con(fset.lower_names[i] or f"lower[{i}]", "lower", i, float(lo[i])))
    for i in range(fset.K):
        if fset.upper_names[i] or hi[i] < 1:
            cons.append(_Con(fset.upper_names[i] or f"upper[{i}]", "upper", i, float(hi[i])))
    cons += [_Con(n, "row", r, float(b[r])) for r, n in enumerate(fset.row_names)]
    return cons + [_Con(_SUM, "sum", 0, 1.0)]


def _feasible(cons: list[_Con], A: np.ndarray, K: int) -> tuple[bool, int]:
    lo, hi = np.zeros(K), np.full(K, np.inf)
    rows, has_sum = [], False
    for c in cons:
        if c.kind == "lower":
            lo[c.index] = max(lo[c.index], c.value)
        elif c.kind == "upper":
            hi[c.index] = min(hi[c.index], c.value)
        elif c.kind == "row":
            rows.append(c)
        else:
            has_sum = True
    if np.any(lo > hi):
        return False, 2
    if not rows:  # a box (with the simplex's sum): exact without an LP
        ok = not has_sum or lo.sum() <= 1 <= hi.sum()
        return ok, 0 if ok else 2  # linprog's statuses: 0 optimal, 2 infeasible
    A_ub = np.array([A[c.index] for c in rows]) if rows else None
    b_ub = np.array([c.value for c in rows]) if rows else None
    res = _lp(np.zeros(K), A_ub, b_ub, np.ones((1, K)) if has_sum else None, np.ones(1) if has_sum else None,
              [(float(l), None if math.isinf(h) else float(h)) for l, h in zip(lo, hi)])
    return res.status == 0, int(res.status)


def _explain(iis: list[_Con], A: np.ndarray) -> str:
    kinds = {c.kind for c in iis}
    caps = [c for c in iis if c.kind == "upper"]
    floors = [c for c in iis if c.kind == "lower"]
    if kinds == {"upper", "sum"}:
        total = sum(c.value for c in caps)
        return ", ".join(f"{c.name} ≤ {c.value:g}" for c in caps) + f" sum to {total:g} < 1"
    if kinds == {"lower", "sum"}:
        total = sum(c.value for c in floors)
        return ", ".join(f"{c.name} ≥ {c.value:g}" for c in floors) + f" sum to {total:g} > 1"
    if kinds == {"lower", "upper"} and len(iis) == 2:
        return f"{floors[0].name} ≥ {floors[0].value:g} exceeds {caps[0].name} ≤ {caps[0].value:g}"
    parts = []
    for c in iis:
        if c.kind == "row":
            terms = " + ".join(f"{a:g}·w{k}" for k, a in enumerate(A[c.index]) if a != 0) or "0"
            parts.append(f"{c.name}: {terms} ≤ {c.value:g}")
        elif c.kind == "lower":
            parts.append(f"{c.name}: w{c.index} ≥ {c.value:g}")
        elif c.kind == "upper":
            parts.append(f"{c.name}: w{c.index} ≤ {c.value:g}")
        else:
            parts.append(_SUM)
    return "; ".join(parts) + " cannot hold together (with w ≥ 0)"


def _slater(lo: np.ndarray, hi: np.ndarray, A: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    K = lo.shape[0]
    keep = np.abs(A).sum(1) > 0
    A, b = A[keep], b[keep]
    I = np.eye(K)
    A_ub = np.vstack([np.hstack([-I, np.ones((K, 1))]), np.hstack([I, np.ones((K, 1))]),
                      np.hstack([A, np.ones((A.shape[0], 1))])])
    b_ub = np.concatenate([-lo, hi, b])
    c = np.zeros(K + 1)
    c[-1] = -1.0
    res = _lp(c, A_ub, b_ub, np.hstack([np.ones((1, K)), np.zeros((1, 1))]), np.ones(1), [(None, None)] * K + [(None, 1.0)])
    if res.status != 0:
        raise SolverError(f"Slater LP failed (linprog status {res.status}): {res.message}")
    return res.x[:K], float(-res.fun)


def diagnose(fset: FeasibleSet) -> DiagnosisResult:
    """Feasibility of every batch element; names a minimal conflicting subset for the first empty one, and
    reports a Slater (strictly interior) point for the first element when all are feasible."""
    if not isinstance(fset, FeasibleSet):
        raise TypeError(f"fset must be a solvers.FeasibleSet, got {type(fset).__name__}")
    batch = tuple(fset.batch_shape)
    N, K, m = math.prod(batch), fset.K, fset.num_rows
    e = fset.expand(batch).to(device="cpu", dtype=torch.float64)
    lo, hi = e.lower.reshape(N, K).numpy(), e.upper.reshape(N, K).numpy()
    A, b = e.A.reshape(N, m, K).numpy(), e.b.reshape(N, m).numpy()
    feasible = np.ones(N, dtype=bool)
    raw = None
    for n in range(N):
        ok, raw = _feasible(_constraints(lo[n], hi[n], b[n], fset), A[n], K)
        feasible[n] = ok
    feas_t = torch.from_numpy(feasible).reshape(batch)
    if feasible.all():
        point, slack = _slater(lo[0], hi[0], A[0], b[0]) if N else (None, None)
        msg = ("feasible; " + (f"strictly interior (Slater) point with margin {slack:.3g}" if slack > 0
               else "no strictly interior point (Slater fails): the set has empty interior")) if N else "feasible (empty batch)"
        return DiagnosisResult(True, Status.OPTIMAL, msg, (), None, feas_t,
                               None if point is None else torch.as_tensor(point, dtype=fset.dtype), slack, raw)
    n = int(np.flatnonzero(~feasible)[0])
    idx = tuple(int(i) for i in np.unravel_index(n, batch)) if batch else ()
    iis = _constraints(lo[n], hi[n], b[n], fset)
    for c in list(iis):
        trial = [d for d in iis if d is not c]
        ok, raw = _feasible(trial, A[n], K)
        if not ok:
            iis = trial
    where = f" (batch element {idx}, {int((~feasible).sum())} of {N} empty)" if batch else ""
    msg = f"infeasible{where}: {_explain(iis, A[n])}"
    logger.info("diagnose: %s", msg)
    return DiagnosisResult(False, Status.INFEASIBLE, msg, tuple(c.name for c in iis), idx, feas_t, None, None, raw)


def require_feasible(fset: FeasibleSet) -> DiagnosisResult:
    """Return the diagnosis of a feasible set; raise :class:`InfeasibleError` (naming the conflict) otherwise."""
    diag = diagnose(fset)
    if not diag.success:
        raise InfeasibleError(diag.message, diag)
    return diag
