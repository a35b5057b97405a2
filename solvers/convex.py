"""Batched projection onto a :class:`~solvers.sets.FeasibleSet` cut by user convex constraints (cvxpy).

``w_i = argmin_{w ∈ F_i, g(w; θ_i) ≤ 0} ½‖w − v_i‖²`` (or ``KL(w‖v_i)``), where ``F_i`` is row ``i``'s
polyhedral set and ``g`` is declared once in cvxpy, vectorised over rows: ``extra(w, params)`` receives the
``(n, K)`` variable (one row per projected vector) and ``cp.Parameter``s of shape ``(n, *s)`` and returns
constraints of shape ``(n,)`` (one value per row, e.g. ``cp.sum(cp.entr(w), axis=1) >= params["h"]``).

* Fast path: the polyhedral projection (:func:`solvers.project`) first; rows where every user constraint
  holds there are done (the point is the projection onto a superset and lies in the subset).
* With smooth torch ``values`` (the constraints' twin) and only inequalities, the other rows are first solved
  by a primal-dual interior point batched over rows in torch (:func:`_interior_point`: one dense (K+1)×(K+1)
  Newton system per row and iteration, about 8 iterations), polished and verified as below; rows whose box has
  no interior, whose polyhedral part was relaxed, or that it does not solve and verify go on to the conic problem.
  Measured on a shared 2-core x86-64 CPU, one thread (1024 rows under an entropy floor, K = 8): 0.08 s instead
  of 0.18 s through Clarabel; at 64 rows a few milliseconds slower (fixed costs of ~10 iterations).
* The remaining rows go to ONE block-structured conic problem per chunk of rows, compiled once per
  ``(rows in the chunk, K, m, metric, extra, parameter shapes)`` with ``Parameter``s (DPP) and re-solved by
  assigning values. Chunks hold 4, 8, …, 256 rows (padded with copies of a row): measured on a 2-core x86-64
  CPU, one thread, cvxpy's compilation and Clarabel's solve grow faster than linearly beyond ~256 rows of K = 8.
  A chunk Clarabel reports inaccurate or fails on (an error, no point: e.g. one empty row under a KL ball) is split
  in four and re-solved, down to single rows.
* Empty rows follow the polyhedral path's rules (box first, then the soft rows by the least uniform ``t``);
  where the user constraints still cannot hold, their inequalities are relaxed by the least uniform ``t``
  (``g ≤ t``, a phase-1 conic problem), equalities are kept. Both are flagged ``RELAXED``.
* With smooth torch ``values`` (the constraints' twin) Clarabel runs at loose tolerances and Newton's method on
  each row's active KKT equations finishes the solve (to ~1e-15); rows it cannot verify are solved again at tight
  tolerances, then one row per problem at the reference's (1e-12), last with Clarabel's static regularisation at
  1e-12 instead of 1e-8; a re-solve is kept where it verifies better.
  Every solved row is verified: feasibility, complementarity and stationarity, ``w = P(v − Aᵀμ − Σ λ_j ∇g_j(w))``
  with smooth ``values``, otherwise by subgradient intervals (:func:`_interval_stationarity`: the gradient by
  autograd or cvxpy's ``grad``, one-sided differences at kinks such as an ℓ1 ball's); rows that fail are
  ``NUMERICAL``.
* Differentiable in ``v`` through the KKT system of the solution (``values`` needed: ``∇g`` and ``∇²g`` by
  autograd); the user constraints must be smooth at the solution (not the ℓ1 ball at a kink).
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import torch
from torch import Tensor

from solvers.errors import InfeasibleError, SolverError
from solvers.projection import (_euclid_box_simplex, _kl_box_simplex, _relax_box, _relax_rows_lp, _tolerance,
                                _validate)
from solvers.projection import project as project_polyhedral
from solvers.reference import _DEFAULT_OPTS as _OPTS_TIGHT
from solvers.reference import _solve
from solvers.results import ProjectionResult, Status
from solvers.sets import FeasibleSet

__all__ = ["project_convex", "constraint_residuals", "inequality_mask", "ConvexProjectionResult", "CHUNKS"]

logger = logging.getLogger(__name__)

Extra = Callable[[cp.Variable, dict[str, cp.Parameter]], list]
Values = Callable[[Tensor, Mapping[str, Tensor]], Tensor]

CHUNKS = (4, 8, 16, 32, 64, 128, 256)  #: rows per conic problem (a chunk is padded up to one of these)
_OPTS = {"CLARABEL": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8}}
# with smooth torch values the Newton polish finishes the solve: a third of the interior-point iterations (measured,
# 1024 rows, entropy floor: 10 instead of 36 at K = 8; ~3% of the rows at K = 4 were solved again with _OPTS;
# looser tolerances sent more rows back and took longer)
_OPTS_FAST = {"CLARABEL": {"tol_gap_abs": 1e-5, "tol_gap_rel": 1e-5, "tol_feas": 1e-5, "tol_ktratio": 1e-5}}
# last pass, one row per problem, for rows the tight pass leaves unverified: Clarabel's static regularisation
# (default 1e-8) bounds its accuracy on exponential cones (a KL-metric row: KKT 2.4e-7 and "inaccurate" by default,
# 3e-9 and optimal at 1e-12)
_OPTS_REG = {"CLARABEL": {**_OPTS_TIGHT["CLARABEL"], "static_regularization_constant": 1e-12}}
_SOLVED = {cp.OPTIMAL, cp.OPTIMAL_INACCURATE}
_KKT_TOL = 1e-7  # conic rows: verified KKT residual (interior-point accuracy at the tolerances above)
_ACTIVE = 1e-9  # multipliers above this mark an active constraint (implicit Jacobian)
_FD_STEP = 1e-7  # largest step of the one-sided differences of the user constraints (certificate without smooth values)
_CACHE: "OrderedDict[tuple, _Block]" = OrderedDict()
_CACHE_SIZE = 64


@dataclass(frozen=True, repr=False, eq=False)
class ConvexProjectionResult(ProjectionResult):
    """:class:`~solvers.results.ProjectionResult` plus the user constraints' per-row columns ``[..., c]``
    (one per returned cvxpy constraint, in order): ``extra_residual`` (signed g, ≤ 0 holds), ``extra_multipliers``
    (λ ≥ 0 for inequalities), ``extra_relaxation [...]`` (uniform t of their relaxation, 0 unless the row was
    empty), ``conic [...]`` (rows that needed a solve, by the interior point or the conic problem; the others were
    certified at the polyhedral projection) and ``raw_status`` (the solver's statuses, e.g. ``{'optimal': 3}``,
    and under ``'interior_point'`` the rows that the batched interior point solved and verified without a conic
    problem)."""

    extra_residual: Tensor
    extra_multipliers: Tensor
    extra_relaxation: Tensor
    conic: Tensor
    raw_status: dict


@dataclass(eq=False)
class _Block:
    """A compiled problem for ``n`` rows: the problem, its parameters, the variable and the constraints whose
    duals are read (``rows``: the m polyhedral rows; ``extra``: the user constraints)."""

    problem: cp.Problem
    params: dict[str, cp.Parameter]
    user: dict[str, cp.Parameter]
    relax: list[cp.Parameter | None]
    w: cp.Variable
    rows: list
    extra: list
    t: cp.Variable | None = None


@functools.cache
def _installed_solvers() -> tuple[str, ...]:
    return tuple(cp.installed_solvers())  # ~40 ms per call in cvxpy


def _check_constraints(cons: object, n: int) -> list:
    """The user's constraints: a list of ``Inequality``/``Equality`` of shape ``(n,)``."""
    if not isinstance(cons, (list, tuple)) or not all(isinstance(c, cp.Constraint) for c in cons):
        raise TypeError("extra(w, params) must return a list of cvxpy constraints")
    for j, c in enumerate(cons):
        if not isinstance(c, (cp.constraints.Inequality, cp.constraints.Equality)):
            raise TypeError(f"extra constraint {j} is a {type(c).__name__}; write it as a row-wise inequality or "
                            "equality (e.g. cp.norm(w - c, 2, axis=1) <= r)")
        if c.shape != (n,):
            raise ValueError(f"extra constraint {j} has shape {c.shape}; it must hold one value per row, shape "
                             f"({n},): reduce over teachers with axis=1 (elementwise bounds belong in the FeasibleSet)")
    return list(cons)


def _param_shapes(params: Mapping[str, Tensor], batch: torch.Size) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{name!r}] must be a torch.Tensor, got {type(p).__name__}")
        if p.dim() < len(batch):
            raise ValueError(f"params[{name!r}] must have v's batch dims {tuple(batch)} first, got {tuple(p.shape)}")
        try:
            torch.broadcast_shapes(p.shape[:len(batch)], batch)
        except RuntimeError:
            raise ValueError(f"params[{name!r}] of shape {tuple(p.shape)} does not broadcast to v's batch dims "
                             f"{tuple(batch)}") from None
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"params[{name!r}] contains NaN or inf")
        shapes[name] = tuple(p.shape[len(batch):])
    return shapes


def _build(n: int, K: int, m: int, metric: str, extra: Extra, shapes: Mapping[str, tuple[int, ...]],
           phase1: bool) -> _Block:
    """The block problem for ``n`` rows (cached). ``phase1``: min Σ t s.t. the same set with ``g ≤ t`` instead."""
    key = (n, K, m, metric, extra, tuple(sorted(shapes.items())), phase1)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    w = cp.Variable((n, K), name="w")
    params = {k: cp.Parameter((n, K), name=k) for k in ("v", "lower", "upper")}
    cons = [cp.sum(w, axis=1) == 1, w >= params["lower"], w <= params["upper"]]
    rows = []
    if m:
        params["b"] = cp.Parameter((n, m), name="b")
        for r in range(m):
            params[f"A{r}"] = cp.Parameter((n, K), name=f"A{r}")
            rows.append(cp.sum(cp.multiply(params[f"A{r}"], w), axis=1) <= params["b"][:, r])
    user = {k: cp.Parameter((n, *s), name=k) for k, s in shapes.items()}
    declared = _check_constraints(extra(w, user), n)
    t = cp.Variable(n, nonneg=True, name="t") if phase1 else None
    relax: list[cp.Parameter | None] = []
    out = []
    for j, c in enumerate(declared):
        if isinstance(c, cp.constraints.Equality):
            relax.append(None)
            out.append(c)
        elif phase1:
            relax.append(None)
            out.append(c.expr <= t)
        else:
            relax.append(cp.Parameter(n, nonneg=True, name=f"relax{j}"))
            out.append(c.expr <= relax[-1])
    if phase1:
        objective = cp.Minimize(cp.sum(t))
    elif metric == "euclidean":
        objective = cp.Minimize(0.5 * cp.sum_squares(w) - cp.sum(cp.multiply(params["v"], w)))
    else:  # params["v"] holds log v
        objective = cp.Minimize(-cp.sum(cp.entr(w)) - cp.sum(cp.multiply(params["v"], w)))
    problem = cp.Problem(objective, cons + rows + out)
    if not problem.is_dcp(dpp=True):
        raise ValueError("the extra constraints are not convex (DCP) with parameters entering affinely (DPP): e.g. a "
                         "parameter may multiply an affine expression without parameters; see cvxpy's DPP rules")
    block = _Block(problem, params, user, relax, w, rows, out, t)
    _CACHE[key] = block
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return block


def _evaluate(extra: Extra, values: Values | None, w: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """Signed residuals ``g [n, c]`` of the user constraints at ``w [n, K]`` (torch ``values`` or cvxpy)."""
    if values is None:
        return constraint_residuals(extra, w, params)
    g = values(w, params)
    if not isinstance(g, Tensor) or g.dim() != 2 or g.shape[0] != w.shape[0]:
        raise ValueError(f"values(w, params) must return a tensor [n={w.shape[0]}, c], got "
                         f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
    return g.to(w.dtype)


def inequality_mask(extra: Extra, K: int, params: Mapping[str, Tensor]) -> Tensor:
    """``[c]`` bool: which constraints of ``extra`` are inequalities (g ≤ 0 holds); the others are (affine)
    equalities, whose violation is ``|g|``. ``params`` ``{name: [n, *s]}`` as for :func:`project_convex`."""
    shapes = {k: tuple(p.shape[1:]) for k, p in params.items()}
    return _inequalities(_build(CHUNKS[0], K, 0, "euclidean", extra, shapes, phase1=False))


def _inequalities(block: _Block) -> Tensor:
    return torch.tensor([isinstance(c, cp.constraints.Inequality) for c in block.extra], dtype=torch.bool)


def constraint_residuals(extra: Extra, w: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """The constraints of ``extra`` evaluated by cvxpy at ``w [n, K]`` (``params`` ``{name: [n, *s]}``): signed
    residuals ``[n, c]`` (``lhs − rhs`` of ``lhs <= rhs``, ``|lhs − rhs|`` of an equality; ≤ 0 holds)."""
    return _residuals(extra, w, params, signed=False)


def _residuals(extra: Extra, w: Tensor, params: Mapping[str, Tensor], signed: bool, gradient: bool = False
               ) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`constraint_residuals`; ``signed``: an equality's ``lhs − rhs`` instead of ``|lhs − rhs|``;
    ``gradient``: also ``∂g/∂w [n, c, K]`` by cvxpy's ``grad`` (a subgradient at a kink; NaN where cvxpy gives
    none, e.g. ``entr`` at a zero coordinate)."""
    n, K = w.shape
    var = cp.Variable((n, K))
    var.value = w.detach().cpu().numpy()
    ps = {}
    for k, p in params.items():
        ps[k] = cp.Parameter(tuple(p.shape))
        ps[k].value = p.detach().cpu().double().numpy()
    cons = _check_constraints(extra(var, ps), n)
    cols = [c.expr.value if signed or isinstance(c, cp.constraints.Inequality) else np.abs(c.expr.value)
            for c in cons]
    g = torch.as_tensor(np.stack(cols, axis=-1) if cols else np.zeros((n, 0)), dtype=w.dtype, device=w.device)
    if not gradient:
        return g
    G = np.full((n, len(cons), K), np.nan)
    rows = np.arange(n)[:, None] + n * np.arange(K)[None, :]  # w[i, k] is entry i + n·k of the variable (column-major)
    for j, c in enumerate(cons):
        d = c.expr.grad.get(var) if c.expr.grad else None
        if d is not None:
            G[:, j] = np.asarray(d.tocsr()[rows.ravel(), np.repeat(np.arange(n), K)]).reshape(n, K)
    return g, torch.as_tensor(G, dtype=w.dtype, device=w.device)


def _set_values(block: _Block, data: dict[str, np.ndarray], user: Mapping[str, np.ndarray], relax: np.ndarray,
                idx: np.ndarray) -> None:
    for k, p in block.params.items():
        if k.startswith("A"):
            p.value = data["A"][idx, int(k[1:])]
        else:
            p.value = data[k][idx]
    for k, p in block.user.items():
        p.value = user[k][idx]
    for j, p in enumerate(block.relax):
        if p is not None:
            p.value = relax[idx, j]


def _solve_block(block: _Block, solver: str, opts: dict) -> str:
    """Solve and return cvxpy's status; cvxpy's "inaccurate" warning is not repeated (such chunks are split and
    re-solved, and every row is verified)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Solution may be inaccurate", category=UserWarning)
            _solve(block.problem, solver, opts)
    except SolverError as exc:
        logger.warning("project_convex: %s", exc)
        return "solver_error"
    return block.problem.status


def _conic(data: dict[str, np.ndarray], user: Mapping[str, np.ndarray], hard: np.ndarray, metric: str,
           extra: Extra, shapes: Mapping[str, tuple[int, ...]], c: int, solver: str, opts: dict,
           rows_max: int = CHUNKS[-1]) -> tuple[np.ndarray, ...]:
    """Solve the rows of ``data`` chunk by chunk (at most ``rows_max`` rows); empty chunks are relaxed (polyhedral rows by LP, then the user
    inequalities by phase 1) and re-solved; inaccurate chunks are split in four and re-solved. Returns ``(w, μ, λ,
    t_rows, t_extra, solved, iterations, raw, inequality mask [c])``."""
    N, K = data["v"].shape
    m = data["b"].shape[1] if "b" in data else 0
    W, MU, LAM = np.zeros((N, K)), np.zeros((N, m)), np.zeros((N, c))
    t_rows, t_extra = np.zeros(N), np.zeros((N, c))
    solved, iters, raw = np.zeros(N, dtype=bool), np.zeros(N, dtype=np.int64), {}
    queue = [np.arange(s, min(s + rows_max, N)) for s in range(0, N, rows_max)]
    while queue:
        idx = queue.pop(0)
        size = next(rows for rows in CHUNKS if rows >= idx.size)
        pad = np.concatenate([idx, np.full(size - idx.size, idx[0])])  # copies of a row fill the chunk
        block = _build(size, K, m, metric, extra, shapes, phase1=False)
        _set_values(block, data, user, t_extra, pad)
        status = _solve_block(block, solver, opts)
        if status not in _SOLVED and m:  # polyhedral part empty somewhere: the least uniform t of the soft rows
            args = [torch.as_tensor(data[k][idx]) for k in ("lower", "upper", "A", "b")]
            t, b = _relax_rows_lp(*args, soft=torch.as_tensor(~hard))
            data["b"][idx], t_rows[idx] = b.numpy(), t.numpy()
            _set_values(block, data, user, t_extra, pad)
            status = _solve_block(block, solver, opts)
        if status not in _SOLVED and c:  # the user constraints cannot hold there: min Σ t with g ≤ t
            one = _build(size, K, m, metric, extra, shapes, phase1=True)
            _set_values(one, data, user, t_extra, pad)
            if _solve_block(one, solver, opts) in _SOLVED:
                t = np.maximum(one.t.value[:idx.size], 0)
                t = np.where(t > 1e-9, t + 1e-7 * (1 + t), 0.0)  # padded: a set with an interior (finite λ)
                t_extra[idx] = t[:, None] * np.array([p is not None for p in block.relax])
                _set_values(block, data, user, t_extra, pad)
                status = _solve_block(block, solver, opts)
        # an inaccurate or failed chunk is split in four down to single rows: smaller blocks solve more accurately,
        # and one hard row (e.g. an empty one, on which Clarabel can stop with an error instead of a certificate of
        # infeasibility) no longer takes the rows sharing its block down with it
        if (status == cp.OPTIMAL_INACCURATE or status not in _SOLVED) and idx.size > 1:
            queue.extend(np.array_split(idx, min(4, idx.size)))
            continue
        raw[status] = raw.get(status, 0) + idx.size
        if status in _SOLVED and block.w.value is not None:
            W[idx] = block.w.value[:idx.size]
            for r, con in enumerate(block.rows):
                MU[idx, r] = np.maximum(con.dual_value[:idx.size], 0)
            for j, con in enumerate(block.extra):
                d = con.dual_value[:idx.size]
                LAM[idx, j] = np.maximum(d, 0) if block.relax[j] is not None else d
            solved[idx] = True
            iters[idx] = block.problem.solver_stats.num_iters or 0
    return W, MU, LAM, t_rows, t_extra, solved, iters, raw, np.array([p is not None for p in block.relax], dtype=bool)


def _curvature(values: Values | None, w: Tensor, params: Mapping[str, Tensor], lam: Tensor,
               hessian: bool = True) -> tuple[Tensor, Tensor]:
    """``(∇g [n, c, K], Σ_j λ_j ∇²g_j [n, K, K])`` by autograd (``g`` acts row by row); zeros without
    ``values`` (and for the second without ``hessian``)."""
    n, K = w.shape
    c = lam.shape[-1]
    if values is None or c == 0 or n == 0:
        return w.new_zeros(n, c, K), w.new_zeros(n, K, K)
    with torch.enable_grad():
        x = w.detach().clone().requires_grad_(True)
        g = values(x, params)
        grads = [torch.autograd.grad(g[:, j].sum(), x, create_graph=hessian,
                                     retain_graph=hessian or j + 1 < c)[0]
                 for j in range(c)]
        s = sum(lam[:, j:j + 1] * grads[j] for j in range(c))
        H = w.new_zeros(n, K, K)
        if hessian and s.requires_grad:
            try:  # the K Hessian-vector products ∂s/∂x · e_k in one vmapped backward pass
                eye = torch.eye(K, dtype=w.dtype, device=w.device)[:, None, :].expand(K, n, K)
                cols = torch.autograd.grad(s, x, grad_outputs=eye, retain_graph=True, allow_unused=True,
                                           is_grads_batched=True)[0]
                if cols is not None:
                    H = cols.permute(1, 2, 0)
            except RuntimeError:  # an operation of values without a batching rule: one pass per coordinate
                for k in range(K):
                    col = torch.autograd.grad(s[:, k].sum(), x, retain_graph=True, allow_unused=True)[0]
                    if col is not None:
                        H[:, :, k] = col
    return torch.stack([gr.detach() for gr in grads], dim=1), H.detach()


def _kkt_matrix(H: Tensor, E: Tensor, free: Tensor) -> Tensor:
    """``[H_FF, E_Fᵀ; E_F, 0]`` padded to full size: identity on the fixed coordinates (zero columns of ``E``) and
    on the multipliers of unused (all-zero) rows of ``E``, whose solution is then 0."""
    F = free.to(H.dtype)
    K, r = H.shape[-1], E.shape[-2]
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    Hf = H * F[:, :, None] * F[:, None, :] + eye * (1 - F)[:, None, :]
    Ef = E * F[:, None, :]
    unused = torch.diag_embed((Ef.abs().amax(-1) == 0).to(H.dtype))
    top = torch.cat([Hf, Ef.transpose(-1, -2)], dim=-1)
    return torch.cat([top, torch.cat([Ef, unused], dim=-1)], dim=-2)


def _kkt_solve(M: Tensor, rhs: Tensor) -> Tensor:
    """``M⁻¹ rhs`` by LU, with the pseudo-inverse where ``M`` is singular (dependent active constraints)."""
    x, info = torch.linalg.solve_ex(M, rhs)
    bad = (info != 0) | ~torch.isfinite(x).flatten(1).all(-1)
    if bool(bad.any()):
        x = x.index_put((bad,), torch.linalg.pinv(M[bad], hermitian=True) @ rhs[bad])
    return x


def _interior_point(vf: Tensor, w0: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, values: Values,
                    params: Mapping[str, Tensor], metric: str, max_iter: int = 40, tol: float = 1e-10
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Primal-dual interior point (Mehrotra predictor-corrector), batched over rows in torch, for
    ``min f(w) s.t. Σw = 1, G(w) = (lo − w, w − hi, Aw − b, g(w)) ≤ 0`` with smooth convex ``g = values`` (all
    inequalities); ``f = ½‖w‖² − vᵀw`` (Euclidean) or ``Σ w log(w/v)`` (KL). With slacks ``G(w) + s = 0, s > 0``,
    duals ``z > 0`` and ``J = ∂G/∂w = (−I, I, A, ∇g)``, each step solves, per row, the bordered system
    ``[∇²f + Σz_g∇²g + JᵀΣJ, 1; 1ᵀ, 0] [Δw; Δν] = [−r_d − Jᵀ(Σ r_p − S⁻¹r_c); 1 − Σw]`` (``Σ = Z S⁻¹``,
    ``r_d = ∇f + Jᵀz + ν1``, ``r_p = G + s``, ``r_c = s∘z − σμ``, ``μ = sᵀz / p``), then ``Δz = Σ(JΔw + r_p) −
    S⁻¹r_c``, ``Δs = −r_p − JΔw``, and steps 99% of the way to the boundary of ``s, z ≥ 0``; the predictor has
    ``σ = 0``, the corrector ``σ = (μ_aff/μ)³`` and adds ``Δs_aff∘Δz_aff`` to ``r_c``. The box slacks are
    ``w − lo``, ``hi − w`` themselves (w stays strictly inside the box, where ``g`` and the KL objective are
    defined; rows need ``lo < hi``); rows and ``g`` start infeasible where ``w0`` violates them. A row stops when
    ``μ`` and ``‖r_p‖∞`` are below ``tol`` and the relative ``‖r_d‖∞`` below ``100·tol``, and leaves the batch
    (so does a row whose step fails, unconverged). Returns ``(w, μ_rows, λ, converged [n], iterations [n])``."""
    n, K = vf.shape
    m = A.shape[1]
    w = 0.9 * torch.minimum(torch.maximum(w0, lo), hi) + 0.05 * (lo + hi)  # strictly inside the box
    g = values(w, params)
    c = g.shape[-1]
    p = 2 * K + m + c
    W, Z = w.clone(), vf.new_zeros(n, p)
    done = torch.zeros(n, dtype=torch.bool, device=vf.device)
    iters = torch.zeros(n, dtype=torch.long, device=vf.device)
    G = lambda w, g: torch.cat([lo - w, w - hi, (A * w[:, None, :]).sum(-1) - b, g], -1)  # noqa: E731
    s = torch.cat([w - lo, hi - w, (-G(w, g)[:, 2 * K:]).clamp_min(1.0)], -1)
    z = torch.ones_like(s)
    nu = vf.new_zeros(n, 1)
    lv = vf.log() if metric == "kl" else vf
    eye = torch.eye(K, dtype=vf.dtype, device=vf.device)
    idx = torch.arange(n, device=vf.device)  # the rows still iterating
    stuck = torch.zeros(n, dtype=torch.bool, device=vf.device)
    for _ in range(max_iter):
        grad_g, Hg = _curvature(values, w, params, z[:, 2 * K + m:])
        J = torch.cat([-eye.expand(w.shape[0], K, K), eye.expand(w.shape[0], K, K), A, grad_g], 1)  # [n, p, K]
        df = w - vf if metric == "euclidean" else w.log() + 1 - lv
        r_d = df + (z[..., None] * J).sum(1) + nu
        r_p = G(w, g) + s
        r_p[:, :2 * K] = 0  # the box slacks are exact
        r_e = w.sum(-1, keepdim=True) - 1
        mu = (s * z).sum(-1) / p
        err = torch.maximum(r_p.abs().amax(-1), r_e.abs()[:, 0])
        # the dual residual to 100·tol: where an entropy term's optimum nearly underflows (w_k ~ 1e-25, ∇²g ~ 1e25)
        # it stalls near 1e-9; the polish and the verification finish
        conv = (mu <= tol) & (err <= tol) & (r_d.abs().amax(-1) <= 100 * tol * (1 + df.abs().amax(-1)))
        if bool((conv | stuck).any()):  # converged rows leave the batch, and so do stuck ones (unconverged)
            leave = conv | stuck
            out = idx[leave]
            W[out], Z[out], done[out] = w[leave], z[leave], conv[leave]
            keep = ~leave
            idx, vf, lv, lo, hi, A, b, w, g, nu, s, z, grad_g, Hg, J, df, r_d, r_p, r_e, mu = (x[keep] for x in (
                idx, vf, lv, lo, hi, A, b, w, g, nu, s, z, grad_g, Hg, J, df, r_d, r_p, r_e, mu))
            if not idx.numel():
                break
            params = {k: x[keep] for k, x in params.items()}
        iters[idx] += 1
        S = z / s
        Jt = J.transpose(-1, -2)
        M = Hg + (Jt * S[:, None, :]) @ J + torch.diag_embed(1 / w if metric == "kl" else torch.ones_like(w))
        one = torch.ones_like(w)
        KKT = torch.cat([torch.cat([M, one[..., None]], -1), torch.cat([one, torch.zeros_like(nu)], -1)[:, None]], -2)
        LU, piv, _ = torch.linalg.lu_factor_ex(KKT)

        def direction(rc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            """Newton direction ``(Δw, Δν, Δs, Δz)`` for the centrality residuals ``r_c``."""
            rhs = -r_d - (Jt @ (S * r_p - rc / s)[..., None])[..., 0]
            sol = torch.linalg.lu_solve(LU, piv, torch.cat([rhs, -r_e], -1)[..., None])[..., 0]
            dw = sol[:, :K]
            Jdw = (J @ dw[..., None])[..., 0]
            return dw, sol[:, K:], -r_p - Jdw, S * (Jdw + r_p) - rc / s

        def step(ds: Tensor, dz: Tensor) -> Tensor:
            """Largest α ≤ 1 keeping ``s + α Δs ≥ 0`` and ``z + α Δz ≥ 0``."""
            x, dx = torch.cat([s, z], -1), torch.cat([ds, dz], -1)
            return torch.where(dx < 0, -x / dx, 1.0).amin(-1).clamp_max(1)

        _, _, ds, dz = direction(s * z)
        a = step(ds, dz)[:, None]
        mu_aff = ((s + a * ds) * (z + a * dz)).sum(-1) / p
        sigma = ((mu_aff / mu.clamp_min(1e-300)) ** 3).clamp_max(1)[:, None]
        dw, dnu, ds, dz = direction(s * z + ds * dz - sigma * mu[:, None])
        a = 0.99 * step(ds, dz)
        stuck = ~(torch.isfinite(a) & torch.isfinite(dw).all(-1) & (a > 0))  # a failed solve or no step
        a = torch.where(stuck, 0.0, a)[:, None]
        w = w + a * torch.nan_to_num(dw)
        nu = nu + a * torch.nan_to_num(dnu)
        s = torch.cat([w - lo, hi - w, s[:, 2 * K:] + a * torch.nan_to_num(ds[:, 2 * K:])], -1)
        z = z + a * torch.nan_to_num(dz)
        g = values(w, params)
    W[idx], Z[idx] = w, z  # the last iterate of the rows that ran out of iterations
    return W, Z[:, 2 * K:2 * K + m], Z[:, 2 * K + m:], done, iters

def _polish(vf: Tensor, w: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, mu: Tensor, lam: Tensor,
            t: Tensor, ineq: Tensor, values: Values, params: Mapping[str, Tensor], metric: str,
            steps: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    """Newton's method on the KKT equations of the active set read off the interior-point solution (bounds within
    1e-9 of ``w``, rows and user inequalities with multipliers > 1e-6, user equalities): ``[Q + Σλ∇²g, Eᵀ; E, 0]
    [Δw; y] = −[∇f(w) − ∇f(v); E-residuals]`` on the free coordinates, y = (ν, μ_R, λ_J) updated whole; stops
    after ``steps`` or once the largest step ``|Δw|`` is ≤ 1e-12 (quadratic convergence: the next is ~1e-24).
    Returns ``(w, μ, λ)``; the caller keeps whichever of the two points verifies better."""
    n, K = w.shape
    at_lo, at_hi = w - lo <= 1e-9, hi - w <= 1e-9  # interior-point accuracy (an error ≤ 1e-9 in w)
    free = ~(at_lo | at_hi)
    w = torch.where(at_lo, lo, torch.where(at_hi, hi, w))
    R = mu > 1e-6
    J = (lam.abs() > 1e-6) | ~ineq
    ones = torch.ones_like(w)[:, None, :]
    for _ in range(steps):
        g = values(w, params)
        grad_g, Hg = _curvature(values, w, params, lam)
        Q = torch.eye(K, dtype=w.dtype, device=w.device).expand(n, K, K) if metric == "euclidean" else \
            torch.diag_embed(1 / w.clamp_min(1e-300))
        E = torch.cat([ones, A * R[..., None], grad_g * J[..., None]], dim=1)
        res = torch.cat([(w.sum(-1, keepdim=True) - 1), ((A * w[:, None, :]).sum(-1) - b) * R, (g - t) * J], dim=-1)
        df = w - vf if metric == "euclidean" else w.clamp_min(1e-300).log() - vf.log()
        rhs = torch.cat([-df * free, -res], dim=-1)[..., None]
        sol = _kkt_solve(_kkt_matrix(Q + Hg, E, free), rhs)[..., 0]
        # clipped to the box; coordinates that reach a bound stay there (where a log term's optimum underflows,
        # e.g. w_k = e^(−1000), Newton keeps pushing towards 0)
        w = torch.minimum(torch.maximum(w + sol[:, :K] * free, lo), hi)
        at_lo, at_hi = at_lo | (free & (w - lo <= 1e-9)), at_hi | (free & (hi - w <= 1e-9))
        free = ~(at_lo | at_hi)
        w = torch.where(at_lo, lo, torch.where(at_hi, hi, w))
        y = sol[:, K:]
        m = A.shape[1]
        mu, lam = y[:, 1:1 + m] * R, y[:, 1 + m:] * J
        if not n or float((sol[:, :K] * free).abs().amax()) <= 1e-12:  # converged: the next step is ~1e-24
            break
    return w, mu, lam


def _verify(vf: Tensor, w: Tensor, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, mu: Tensor, lam: Tensor,
            g: Tensor, t: Tensor, ineq: Tensor, values: Values | None, params: Mapping[str, Tensor], metric: str,
            evaluate: tuple[Values, Callable[[Tensor, Mapping[str, Tensor]], Tensor]] | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
    """KKT residual per row: max of primal violation (Σw = 1, bounds, rows, ``g ≤ t``), complementarity
    ``|min(μ, slack)|``, ``|min(λ, t − g)|`` and, with smooth ``values``, the relative stationarity error
    ``‖P(v − Aᵀμ − Σλ∇g) − w‖∞`` (P: the box∩simplex projection of the metric); without them, ``evaluate``
    ``(signed residuals, their gradient [n, c, K])`` (non-smooth torch values, or cvxpy) gives the subgradient form
    of stationarity (:func:`_interval_stationarity`). Returns ``(kkt, ∇g, Σλ∇²g)``."""
    kkt = torch.maximum((w.sum(-1) - 1).abs(), torch.maximum(lo - w, w - hi).amax(-1))
    if A.shape[1]:
        slack = b - (A * w[:, None, :]).sum(-1)
        kkt = torch.maximum(kkt, torch.maximum((-slack).amax(-1), torch.minimum(mu, slack).abs().amax(-1)))
    if g.shape[-1]:
        gap = torch.where(ineq, torch.minimum(lam, t - g).abs(), (g - t).abs())
        kkt = torch.maximum(kkt, torch.maximum((g - t).amax(-1), gap.amax(-1)))
    grad_g, Hg = _curvature(values, w, params, lam)
    if values is None and evaluate is not None and g.shape[-1] and w.shape[0]:
        left, right, curv = _subgradients(*evaluate, w, lo, params)
        kkt = torch.maximum(kkt, _interval_stationarity(vf, w, lo, hi, A, mu, lam, left, right, curv, metric))
    if values is not None:
        # coordinates within 1e-12 of a bound count as fixed there: where a log term's exact optimum underflows
        # (w_k = e^(−1000) at a tiny λ), ∇g at the clamped w would be wrong by λ·(1000 − 708)
        at_lo, at_hi = (w - lo <= 1e-12) & (lo < hi), (hi - w <= 1e-12) & (lo < hi)
        at_hi = at_hi & ~at_lo
        free = (lo < hi) & ~at_lo & ~at_hi
        shift = (mu[..., None] * A).sum(-2) + (lam[..., None] * grad_g).sum(-2)
        lo_f, hi_f = torch.where(at_lo | at_hi, w, lo), torch.where(at_lo | at_hi, w, hi)
        if metric == "euclidean":
            scale = torch.maximum(vf.abs().amax(-1), shift.abs().amax(-1)).clamp_min(1)
            st = (_euclid_box_simplex(vf - shift, lo_f, hi_f) - w).abs().amax(-1) / scale
        else:
            scale = shift.abs().amax(-1).clamp_min(1)
            # y = log v − shift is shifted by its max over the coordinates left free (lo_f < hi_f); a held one is
            # pinned whatever its y, so its exponent is set to 0. Shifting by the max over every coordinate, a held
            # coordinate far above the free ones (λ ~ 500 on a relaxed, nearly one-point set: a gap of ~450) left
            # the free ones at e^(−450) and the box-simplex search wrong by O(1) at an exact optimum
            y = vf.log() - shift
            pinned = lo_f >= hi_f
            top = torch.where(pinned, -math.inf, y).amax(-1, keepdim=True)
            y = torch.where(pinned, 0.0, y - torch.where(torch.isfinite(top), top, 0.0))
            st = (_kl_box_simplex(y.exp(), lo_f, hi_f) - w).abs().amax(-1)
        kkt = torch.maximum(kkt, st)
        if bool((at_lo | at_hi).any()):
            kkt = torch.maximum(kkt, _bound_signs(vf, w, lo, hi, at_lo, at_hi, free, shift, mu, lam, A, values,
                                                  params, metric) / scale)
    return kkt, grad_g, Hg


def _subgradients(evaluate: Callable[[Tensor, Mapping[str, Tensor]], Tensor],
                  gradient: Callable[[Tensor, Mapping[str, Tensor]], Tensor], w: Tensor, lo: Tensor,
                  params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Coordinate-wise bounds ``(left, right)`` ``[n, c, K]`` on the subgradients of the user constraints at ``w``,
    and their curvatures. ``gradient`` (autograd or cvxpy's ``grad``: exact where ``g`` is smooth, one subgradient
    at a kink; NaN where unknown) is taken where the one-sided partial derivatives agree, otherwise the interval
    they span. The one-sided derivatives of the signed residuals (``evaluate``) are Richardson-extrapolated
    differences, ``right_k = 2D(h) − D(2h)`` with ``D(h) = (g(w + h e_k) − g(w))/h`` (the O(h) term of a smooth
    ``g`` cancels, an affine piece is exact) and ``left_k`` likewise with ``−h``, steps ``h_k = clip(1e-3·w_k,
    1e-10, 1e-7)``; a kink (``w_k = p_k`` under an ℓ1 ball) is a jump ``right_k − left_k > 1e-3·(1 + |∇g_k|)``.
    Where ``w_k − 2h_k`` leaves the box (``< lo_k``) the left derivative is the right one. The curvatures
    ``∂²g/∂w_k²`` (0 at a kink) are ``(D(h) − D(−h))/h``, or ``2(D(2h) − D(h))/h`` near the lower bound: only
    their order of magnitude matters (they weigh the stationarity residual), e.g. ~1e10 for an entropy term at
    ``w_k`` = 6e-13 where ``1/w_k`` is 2e12. All ``(4K+1)·n`` shifted rows go through one evaluation, the gradient
    through one call at ``w``."""
    n, K = w.shape
    eye = torch.eye(K, dtype=w.dtype, device=w.device)

    def shifted(steps: Tensor) -> Tensor:  # steps [s, n, K] -> rows w + steps[s, i, k]·e_k, [s·K·n, K]
        st = steps.permute(0, 2, 1)[..., None]  # [s, K (coordinate), n, 1]
        return (w[None, None] + st * eye[None, :, None, :]).reshape(-1, K)

    rep = lambda r: {k: p.repeat(r, *([1] * (p.dim() - 1))) for k, p in params.items()}  # noqa: E731
    h = (1e-3 * w).clamp(_FD_STEP * 1e-3, _FD_STEP)
    hs = torch.stack([h, 2 * h, -h, -2 * h])
    g = evaluate(torch.cat([w, shifted(hs)]), rep(4 * K + 1)).reshape(4 * K + 1, n, -1)
    d = ((g[1:].reshape(4, K, n, -1) - g[0]) / hs.permute(0, 2, 1)[..., None]).permute(0, 2, 3, 1)  # [4, n, c, K]
    right, left = 2 * d[0] - d[1], 2 * d[2] - d[3]
    inside = (w - 2 * h >= lo)[:, None, :]
    left = torch.where(inside, left, right)
    grad = gradient(w, params)
    known = torch.isfinite(grad)
    kink = ~known | (right - left > 1e-3 * (1 + grad.abs()))
    lo_s = torch.where(kink, torch.where(known, torch.minimum(left, grad), left), grad)
    hi_s = torch.where(kink, torch.where(known, torch.maximum(right, grad), right), grad)
    curv = torch.where(inside, d[0] - d[2], 2 * (d[1] - d[0])) / h[:, None, :]  # D(h) − D(−h), or forward
    curv = torch.where(kink, 0.0, curv)
    return lo_s, hi_s, torch.nan_to_num(curv, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)


def _interval_stationarity(vf: Tensor, w: Tensor, lo: Tensor, hi: Tensor, A: Tensor, mu: Tensor, lam: Tensor,
                           left: Tensor, right: Tensor, curv: Tensor, metric: str) -> Tensor:
    """Stationarity with subgradients, for user constraints without smooth ``values`` (non-smooth, or evaluated
    by cvxpy): with ``r = ∇f(w) + Aᵀμ`` and ``λ_j s_j``, ``s_j ∈ ∂g_j(w)`` taken coordinate-wise in
    ``λ_j·[left_jk, right_jk]`` (:func:`_subgradients`; an equality's λ has either sign), ``w`` is stationary iff
    some ν has ``r_k + Σ_j λ_j s_jk + ν`` = 0 on the free coordinates, ≥ 0 at a lower and ≤ 0 at an upper bound,
    i.e. ``ν ∈ [L_k, U_k]`` with ``L_k = −r_k − max_s`` (free, lower bound; −∞ at an upper bound) and
    ``U_k = −r_k − min_s`` (free, upper bound; +∞ at a lower bound; within 1e-9 of a bound counts as held there,
    the interior-point accuracy the polish also uses). Returns ``min_ν max_k c_k·dist(ν, [L_k,
    U_k])`` (60 bisections on ν), in units of ``w``: ``c_k = 1/(∂²f_kk + Σ_j |λ_j| ∂²g_j,kk)`` (``curv``: the
    coordinate's Newton step; under an entropy term 1/(1 + λ/w_k), as a coordinate of 1e-9 moved by 1e-13 changes
    ``log w_k`` by 1e-4) with ``∂²f_kk = 1`` (Euclidean; then divided by ``max(|v|, |shift|, 1)`` like
    :func:`_verify`) or ``1/w_k`` (KL). Coordinate-wise intervals are exact for separable kinks (ℓ1 balls) and a
    relaxation otherwise."""
    at_lo, at_hi = (w - lo <= 1e-9) & (lo < hi), (hi - w <= 1e-9) & (lo < hi)  # as the polish (unpolished here)
    at_hi = at_hi & ~at_lo
    fixed = lo >= hi
    tiny = torch.finfo(w.dtype).tiny
    a, b = lam[..., None] * left, lam[..., None] * right
    s_lo, s_hi = torch.minimum(a, b).sum(-2), torch.maximum(a, b).sum(-2)
    df = w - vf if metric == "euclidean" else w.clamp_min(tiny).log() - vf.log()
    r = df + (mu[..., None] * A).sum(-2)
    L = torch.where(at_hi | fixed, -math.inf, -r - s_hi)
    U = torch.where(at_lo | fixed, math.inf, -r - s_lo)
    q = torch.ones_like(w) if metric == "euclidean" else 1 / w.clamp_min(tiny)
    c = torch.where(fixed, 0.0, 1 / (q + (lam.abs()[..., None] * curv).sum(-2)))
    ends = torch.cat([L, U], -1)
    a_ = torch.where(torch.isfinite(ends), ends, math.inf).amin(-1)
    b_ = torch.where(torch.isfinite(ends), ends, -math.inf).amax(-1)
    a_, b_ = torch.where(torch.isfinite(a_), a_, 0.0), torch.where(torch.isfinite(b_), b_, 0.0)

    def sides(nu: Tensor) -> tuple[Tensor, Tensor]:
        """The largest weighted distance below the intervals' lower ends and above their upper ends."""
        return (c * (L - nu[:, None]).clamp_min(0)).amax(-1), (c * (nu[:, None] - U).clamp_min(0)).amax(-1)

    for _ in range(60):
        mid = (a_ + b_) / 2
        below, above = sides(mid)
        a_, b_ = torch.where(below > above, mid, a_), torch.where(below > above, b_, mid)
    below, above = sides((a_ + b_) / 2)
    viol = torch.maximum(below, above)
    if metric == "euclidean":
        shift = (mu[..., None] * A).sum(-2) + torch.maximum(s_lo.abs(), s_hi.abs())
        viol = viol / torch.maximum(vf.abs().amax(-1), shift.abs().amax(-1)).clamp_min(1)
    return viol


def _bound_signs(vf: Tensor, w: Tensor, lo: Tensor, hi: Tensor, at_lo: Tensor, at_hi: Tensor, free: Tensor,
                 shift: Tensor, mu: Tensor, lam: Tensor, A: Tensor, values: Values, params: Mapping[str, Tensor],
                 metric: str) -> Tensor:
    """Sign of the bound multipliers of the coordinates held at a bound (the stationarity check fixes them):
    with ``r = ∇f + Aᵀμ + Σλ∇g`` (KL: ``log w − log v + …``), stationarity reads ``r_k + ν = z_lo,k − z_hi,k``,
    0 on the free coordinates (which give ν, their mean), ≥ 0 at a lower and ≤ 0 at an upper bound (without free
    coordinates: some ν between the bounds' limits). ``r`` of a held coordinate is taken 1e-9 inside its bound (at
    most half the box): the certificate then reads "the coordinate's optimum is within 1e-9 of the bound", which
    holds where a log term's optimum underflows and fails where a coordinate was wrongly held. Returns the
    largest violation per row."""
    step = torch.minimum(torch.full_like(w, 1e-9), (hi - lo) / 2)
    inside = torch.where(at_lo, lo + step, torch.where(at_hi, hi - step, w))
    tiny = torch.finfo(w.dtype).tiny
    df = lambda x: x - vf if metric == "euclidean" else x.clamp_min(tiny).log() - vf.log()  # noqa: E731
    grad_in, _ = _curvature(values, inside, params, lam, hessian=False)
    r_in = df(inside) + (mu[..., None] * A).sum(-2) + (lam[..., None] * grad_in).sum(-2)
    r = df(w) + shift
    n_free = free.sum(-1)
    nu = -(r * free).sum(-1) / n_free.clamp_min(1)
    low = torch.where(at_lo, -r_in, -math.inf).amax(-1)  # ν ≥ −r_k at a lower bound
    high = torch.where(at_hi, -r_in, math.inf).amin(-1)  # ν ≤ −r_k at an upper bound
    viol = torch.where(n_free > 0, torch.maximum(low - nu, nu - high), (low - high) / 2)
    return torch.nan_to_num(viol, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)


class _ConvexFn(torch.autograd.Function):
    """Identity forward on the solved ``w``; backward solves the KKT system of the active constraints on the
    free coordinates F: ``[Q + Σλ∇²g, Eᵀ; E, 0] [x; y] = [ḡ_F; 0]`` with ``E`` = (1, active rows, active ∇g)
    and returns ``B x`` (``Q = I, B = I`` for Euclidean; ``Q = diag(1/w), B = diag(1/v)`` for KL)."""

    @staticmethod
    def forward(ctx, v: Tensor, w: Tensor, H: Tensor, E: Tensor, free: Tensor, B: Tensor) -> Tensor:  # noqa: D401
        ctx.save_for_backward(H, E, free, B)
        return w.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        H, E, free, B = ctx.saved_tensors
        F = free.to(H.dtype)
        K, r = H.shape[-1], E.shape[-2]
        rhs = torch.cat([grad.to(H.dtype) * F, H.new_zeros(H.shape[0], r)], dim=-1)[..., None]
        x = _kkt_solve(_kkt_matrix(H, E, free), rhs)[..., :K, 0] * F
        return (B * x).to(grad.dtype), None, None, None, None, None


def project_convex(
    v: Tensor,
    fset: FeasibleSet,
    extra: Extra,
    params: Mapping[str, Tensor] | None = None,
    *,
    values: Values | None = None,
    smooth: bool = True,
    metric: str = "euclidean",
    return_info: bool = False,
    on_all_empty: str = "raise",
    solver: str = "CLARABEL",
    solver_opts: dict | None = None,
    interior_point: bool = True,
) -> Tensor | tuple[Tensor, ConvexProjectionResult]:
    """Projection of every row of ``v[..., K]`` onto ``fset`` ∩ {the constraints of ``extra``} (module docstring).

    Args:
        v: points ``[..., K]`` (probabilities > 0 for ``metric="kl"``).
        fset: the polyhedral set (batched like ``v`` or broadcast).
        extra: ``extra(w, params) -> [constraints]`` with ``w`` the ``(n, K)`` cvxpy variable and ``params`` the
            ``cp.Parameter``s ``(n, *s)``; each constraint has shape ``(n,)``. Build it once (a module-level
            function or a kept object): the compiled problem is cached on it.
        params: ``{name: Tensor [..., *s]}`` values of the parameters, row by row (batch dims of ``v`` first,
            broadcast allowed).
        values: torch twin of ``extra``: ``values(w [n, K], params) -> g [n, c]``, the signed residuals
            (``lhs − rhs`` of ``lhs <= rhs``, ``rhs − lhs`` of ``lhs >= rhs``, ``lhs − rhs`` of an (affine)
            ``lhs == rhs``), one column per constraint of ``extra`` in order, acting row by row. Used to
            certify rows, verify stationarity and differentiate; without it rows are certified through cvxpy and
            the result is not differentiable.
        smooth: whether ``values`` is differentiable at the solutions (entropy, KL: yes; an ℓ1 ball: no, kinks).
            Only smooth ``values`` polish, verify stationarity and differentiate; otherwise they certify and measure.
        metric: ``"euclidean"`` or ``"kl"``.
        on_all_empty: ``"raise"`` (an :class:`~solvers.InfeasibleError` when every row had to be relaxed) or
            ``"relax"``.
        solver, solver_opts: the cvxpy solver and options (tight Clarabel tolerances by default).
        interior_point: with smooth ``values`` and only inequalities in ``extra``, solve the rows first by the
            batched torch interior point (:func:`_interior_point`); rows it does not solve and verify go to the
            conic problem. ``False``: the conic problem for every row.

    Returns ``w`` (shape, dtype and device of ``v``), and with ``return_info`` a :class:`ConvexProjectionResult`.

    Raises:
        ValueError / TypeError: bad arguments, constraints of the wrong shape or not DPP; ``v`` requires grad
            without ``values``.
        InfeasibleError: every row is empty and ``on_all_empty="raise"``.
    """
    fset = _validate(v, fset, metric, allow_rows_kl=True)
    if not callable(extra):
        raise TypeError(f"extra must be callable (w, params) -> list of cvxpy constraints, got {type(extra).__name__}")
    if values is not None and not callable(values):
        raise TypeError(f"values must be callable (w, params) -> Tensor [n, c], got {type(values).__name__}")
    if on_all_empty not in ("raise", "relax"):
        raise ValueError(f"on_all_empty must be 'raise' or 'relax', got {on_all_empty!r}")
    if solver not in _installed_solvers():
        raise ValueError(f"solver {solver!r} is not installed; installed: {cp.installed_solvers()}")
    differentiate = v.requires_grad and torch.is_grad_enabled()
    if differentiate and (values is None or not smooth):
        raise ValueError("v requires grad: the implicit gradient needs smooth values= (the torch twin of extra); "
                         "pass them, or detach v")
    params = dict(params or {})
    shape, K, m = v.shape, fset.K, fset.num_rows
    batch = shape[:-1]
    N = math.prod(batch)
    shapes = _param_shapes(params, batch)
    block0 = _build(CHUNKS[0], K, m, metric, extra, shapes, phase1=False)  # validates extra once
    declared = len(block0.extra)
    # float64 throughout (the solver's precision); on the CPU where the device lacks it (MPS)
    dt, dev = torch.float64, (torch.device("cpu") if v.device.type == "mps" else v.device)
    e = fset.expand(batch).to(device=dev, dtype=dt)
    lo, hi = e.lower.reshape(N, K), e.upper.reshape(N, K)
    A, b = e.A.reshape(N, m, K), e.b.reshape(N, m)
    rows_p = {k: p.expand(*batch, *s).reshape(N, *s).to(dev, dt) for (k, p), s in zip(params.items(), shapes.values())}
    vf = v.detach().reshape(N, K).to(dev, dt)
    # which user constraints are inequalities (g ≤ 0 holds) and which equalities (g = 0: |g| measures the violation)
    ineq = _inequalities(block0).to(dev)

    # 1. polyhedral fast path (Euclidean, or KL on box∩simplex); certify rows where the user constraints hold
    if metric == "euclidean" or m == 0:
        w, info = project_polyhedral(vf.reshape(shape), fset.to(device=dev, dtype=dt), metric=metric, return_info=True,
                                     on_all_empty=on_all_empty)
        w, kkt_fast = w.reshape(N, K), info.kkt_residual.reshape(N)
        mu, status, relax_rows = info.multipliers.reshape(N, m), info.status.reshape(N), info.relaxation.reshape(N)
    else:  # KL with rows: no polyhedral fast path
        w, mu = vf.clone(), vf.new_zeros(N, m)
        status, relax_rows = torch.zeros(N, dtype=torch.long, device=dev), vf.new_zeros(N)
        kkt_fast = vf.new_zeros(N)
    g = _evaluate(extra, values, w, rows_p)
    c = g.shape[-1]
    if c != declared:
        raise ValueError(f"values(w, params) returns {c} column(s) but extra declares {declared} constraint(s); "
                         "give one column per constraint, in order")
    if metric == "euclidean" or m == 0:  # rows where the user constraints hold at the polyhedral point are done
        todo = (torch.where(ineq, g, g.abs()) > _tolerance(dt)).any(-1).nonzero()[:, 0]
    else:
        todo = torch.arange(N, device=dev)
    lam, relax_extra = vf.new_zeros(N, c), vf.new_zeros(N, c)
    iters = torch.zeros(N, dtype=torch.long, device=dev)
    conic = torch.zeros(N, dtype=torch.bool, device=dev)
    raw: dict[str, int] = {}

    # 2. the other rows: block conic problems, then (3.) polished by Newton on their active set and verified. With
    # smooth values the first pass runs Clarabel at loose tolerances (the polish does the rest); rows that still
    # fail verification are solved again at tight tolerances
    curved = values if smooth else None  # ∇g, ∇²g only where g is smooth
    # otherwise stationarity is verified by one-sided differences of the signed residuals (torch or cvxpy)
    kinked = None if curved is not None else (values, lambda x, p: _curvature(
        values, x, p, x.new_zeros(x.shape[0], c), hessian=False)[0]) if values is not None else (
        lambda x, p: _residuals(extra, x, p, signed=True), lambda x, p: _residuals(extra, x, p, True, True)[1])
    kkt, grad_g, Hg = _verify(vf, w, lo, hi, A, b, mu, lam, g, relax_extra, ineq, curved, rows_p, metric)
    hard = np.array(fset.hard_rows, dtype=bool)
    as_t = lambda x: torch.as_tensor(x, device=dev)  # noqa: E731

    def polish(sel: Tensor) -> None:
        """Newton on the active KKT equations of rows ``sel``; keeps whichever point verifies better."""
        nonlocal w, mu, lam, g, kkt, grad_g, Hg
        if curved is None or not sel.numel():
            return
        sub = lambda *xs: [x[sel] for x in xs]  # noqa: E731
        p_i = {k: p[sel] for k, p in rows_p.items()}
        w2, mu2, lam2 = _polish(*sub(vf, w, lo, hi, A, b, mu, lam, relax_extra), ineq, curved, p_i, metric)
        g2 = _evaluate(extra, values, w2, p_i)
        kkt2, gg2, H2 = _verify(*sub(vf), w2, *sub(lo, hi, A, b), mu2, lam2, g2, relax_extra[sel], ineq, curved,
                                p_i, metric)
        better = kkt2 < kkt[sel]
        take = sel[better]
        w, mu, lam, g, kkt, grad_g, Hg = (x.index_put((take,), y[better]) for x, y in zip(
            (w, mu, lam, g, kkt, grad_g, Hg), (w2, mu2, lam2, g2, kkt2, gg2, H2)))

    # 2a. smooth inequalities: the batched interior point in torch on the rows whose box has an interior and whose
    # polyhedral part needed no relaxation; the rows it solves and verifies skip the conic problem
    if curved is not None and interior_point and todo.numel() and all(p is not None for p in block0.relax):
        lt, ht = lo[todo], hi[todo]
        fit = ((ht - lt) > 1e-9).all(-1) & (lt.sum(-1) < 1) & (ht.sum(-1) > 1) & (relax_rows[todo] <= _tolerance(dt))
        ip = todo[fit]
        if ip.numel():
            p_i = {k: p[ip] for k, p in rows_p.items()}
            w_i, mu_i, lam_i, _, it_i = _interior_point(vf[ip], w[ip], lo[ip], hi[ip], A[ip], b[ip], curved, p_i,
                                                        metric)
            iters[ip] += it_i
            conic[ip] = True
            # every row's last iterate is polished and verified (one that stalled short of the tolerances, e.g. at
            # w_k ~ 1e-14 under an entropy term, often verifies); rows that fail go back to the polyhedral point
            before = (w, mu, lam, g, status)
            w, lam, mu = w.index_put((ip,), w_i), lam.index_put((ip,), lam_i), mu.index_put((ip,), mu_i)
            g = g.index_put((ip,), _evaluate(extra, values, w_i, p_i))
            status = status.index_put((ip,), torch.full_like(ip, int(Status.OPTIMAL)))
            kkt, grad_g, Hg = _verify(vf, w, lo, hi, A, b, mu, lam, g, relax_extra, ineq, curved, rows_p, metric)
            polish(ip)
            ok = kkt[ip] <= _KKT_TOL
            failed = ip[~ok]
            w, mu, lam, g, status = (x.index_put((failed,), y[failed]) for x, y in zip((w, mu, lam, g, status), before))
            raw["interior_point"] = int(ok.sum())
            todo = todo[~torch.isin(todo, ip[ok])]
    passes = ((_OPTS_FAST, CHUNKS[-1]),) if curved is not None else ()
    for attempt, (base, rows_max) in enumerate(passes + ((_OPTS, CHUNKS[-1]), (_OPTS_TIGHT, 1), (_OPTS_REG, 1))):
        if attempt:  # rows solved (interior point or conic) that still fail verification
            todo = (conic & (kkt > _KKT_TOL)).nonzero()[:, 0]
        if not todo.numel():
            break
        # a re-solve keeps the rows where it verifies worse (a row already solved once)
        kept = [x[todo] for x in (w, mu, lam, g, kkt, grad_g, Hg, status, b, lo, hi, relax_extra, relax_rows)]
        opts = dict(base.get(solver, {}), **(solver_opts or {}))
        lo_r, hi_r, t_box = _relax_box(lo[todo], hi[todo])
        data = {"v": (vf[todo].log() if metric == "kl" else vf[todo]).cpu().numpy(), "lower": lo_r.cpu().numpy(),
                "upper": hi_r.cpu().numpy()}
        if m:
            data["A"], data["b"] = A[todo].cpu().numpy(), b[todo].cpu().numpy().copy()
        user = {k: p[todo].cpu().numpy() for k, p in rows_p.items()}
        Wc, MUc, LAMc, t_rows, t_extra, solved, it_c, raw_c, ineq_np = _conic(data, user, hard, metric, extra, shapes,
                                                                            c, solver, opts)
        for key, cnt in raw_c.items():
            raw[key] = raw.get(key, 0) + cnt
        ineq = as_t(ineq_np)
        ok = as_t(solved)
        sel = todo[ok]
        w = w.index_put((sel,), as_t(Wc)[ok].to(dt))
        if m:
            mu = mu.index_put((sel,), as_t(MUc)[ok])
            b = b.index_put((todo,), as_t(data["b"]).to(dt))
        lam = lam.index_put((sel,), as_t(LAMc)[ok])
        relax_extra = relax_extra.index_put((todo,), as_t(t_extra))
        relax_rows = relax_rows.index_put((todo,), torch.maximum(relax_rows[todo], torch.maximum(t_box, as_t(t_rows))))
        lo, hi = lo.index_put((todo,), lo_r), hi.index_put((todo,), hi_r)
        iters = iters.index_put((todo,), iters[todo] + as_t(it_c))
        conic[todo] = True
        g = g.index_put((sel,), _evaluate(extra, values, w[sel], {k: p[sel] for k, p in rows_p.items()}))
        status = status.index_put((todo,), torch.full_like(todo, int(Status.NUMERICAL)))
        status = status.index_put((sel,), torch.full_like(sel, int(Status.OPTIMAL)))
        kkt, grad_g, Hg = _verify(vf, w, lo, hi, A, b, mu, lam, g, relax_extra, ineq, curved, rows_p, metric)
        if kinked is not None and sel.numel():  # stationarity by subgradients (no smooth values)
            kkt = kkt.index_put((sel,), _verify(vf[sel], w[sel], lo[sel], hi[sel], A[sel], b[sel], mu[sel], lam[sel],
                                                g[sel], relax_extra[sel], ineq, None,
                                                {k: p[sel] for k, p in rows_p.items()}, metric, kinked)[0])
        polish(sel)
        if attempt:
            worse = kkt[todo] > kept[4]
            back = todo[worse]
            w, mu, lam, g, kkt, grad_g, Hg, status, b, lo, hi, relax_extra, relax_rows = (
                x.index_put((back,), y[worse]) for x, y in zip(
                    (w, mu, lam, g, kkt, grad_g, Hg, status, b, lo, hi, relax_extra, relax_rows), kept))
    if unsolved := int((conic & (status == int(Status.NUMERICAL))).sum()):
        logger.warning("project_convex: %d row(s) not solved by %s (%s); kept the polyhedral point, status "
                       "NUMERICAL", unsolved, solver, raw)
    kkt = torch.where(conic, kkt, kkt_fast)  # certified rows: the polyhedral projection's own (on its relaxed set)
    # a relaxed row's set is nearly a point (t* padded by 1e-7): the interior-point answer is 10x less accurate
    bad = conic & (kkt > _KKT_TOL * torch.where((relax_extra > 0).any(-1), 10.0, 1.0)) & (status == int(Status.OPTIMAL))
    if bool(bad.any()):
        logger.warning("project_convex: %d conic row(s) failed KKT verification (tol %.0e)", int(bad.sum()), _KKT_TOL)
        status = torch.where(bad, int(Status.NUMERICAL), status)
    empty = (relax_rows > _tolerance(dt)) | (relax_extra > 0).any(-1)
    status = torch.where(empty & (status == int(Status.OPTIMAL)), int(Status.RELAXED), status)
    if on_all_empty == "raise" and N and bool(empty.all()):
        names = [f"extra[{j}]" for j in range(c) if bool((relax_extra[:, j] > 0).any())]
        raise InfeasibleError("the feasible set is empty in every row: the polyhedral set"
                              + (f" together with {names}" if names else "") + " has no common point")
    # 4. gradient: KKT system of the active constraints
    active_lower, active_upper = w <= lo + 1e-9, w >= hi - 1e-9
    out = w
    if differentiate:
        free = ~(active_lower | active_upper)
        Q = torch.eye(K, dtype=dt, device=dev).expand(N, K, K) if metric == "euclidean" else \
            torch.diag_embed(1 / w.clamp_min(torch.finfo(dt).tiny))
        Bm = torch.ones_like(vf) if metric == "euclidean" else 1 / vf
        E = torch.cat([torch.ones_like(w)[:, None, :], A * (mu > _ACTIVE)[..., None].to(dt),
                       grad_g * (lam.abs() > _ACTIVE)[..., None].to(dt)], dim=1)
        out = _ConvexFn.apply(v.reshape(N, K).to(dev, dt), w, Q + Hg, E, free, Bm)
    out = out.to(v.device, v.dtype).reshape(shape)
    if not return_info:
        return out
    counts = {s.name: int((status == int(s)).sum()) for s in Status if bool((status == int(s)).any())}
    success = bool((status <= int(Status.RELAXED)).all())
    message = (f"convex projection {'succeeded' if success else 'has unverified rows'}; rows by status: "
               f"{counts or {'OPTIMAL': 0}}; {int(conic.sum())} of {N} row(s) needed the conic solve"
               f" ({raw.get('interior_point', 0)} of them solved by the batched interior point)")
    def rs(x: Tensor, *tail: int) -> Tensor:  # back to v's device (and dtype for values), batch shape
        return x.to(v.device, v.dtype if x.is_floating_point() else x.dtype).reshape(*batch, *tail)

    info = ConvexProjectionResult(
        success=success, status=rs(status), message=message, kkt_residual=rs(kkt),
        active=rs(mu > _ACTIVE, m), active_lower=rs(active_lower, K), active_upper=rs(active_upper, K),
        iterations=rs(iters), relaxation=rs(relax_rows),
        multipliers=rs(mu, m), extra_residual=rs(g, c), extra_multipliers=rs(lam, c),
        extra_relaxation=rs(relax_extra.amax(-1) if c else vf.new_zeros(N)), conic=rs(conic),
        raw_status=raw)
    return out, info
