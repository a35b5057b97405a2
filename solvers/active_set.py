"""Batched Goldfarb–Idnani dual active-set method for ``min ½‖x − v‖²`` s.t. ``Σx = 1, lo ≤ x ≤ hi, A x ≤ b``.

Every inequality is written ``c_jᵀx ≥ d_j`` (lower bound ``e_i, lo_i``; upper ``−e_i, −hi_i``; row ``−a_r, −b_r``).
Goldfarb & Idnani (1983): start from the optimum of a subproblem (here the box∩simplex projection, whose
bound multipliers are known in closed form), pick the most violated constraint ``p`` and move along
``z = P c_p`` (``P`` = projector onto the null space of the active normals ``N``) while the active multipliers
change by ``−t·r``, ``r = N⁺ c_p``; an active multiplier that reaches 0 is dropped (partial step), ``p`` is added
once satisfied (full step), and a ``p`` dependent on the active set (``z = 0``) forces a drop. The dual value
increases strictly, so the method terminates finitely and the active normals stay linearly independent.

With the identity Hessian and the bounds eliminated, ``P`` and ``N⁺`` need one masked ``(1+m)×(1+m)`` Gram solve
on the free coordinates (inactive rows get identity rows). Every batch row carries its own active set; rows
leave the working batch as soon as they are done (index compaction), so late steps touch few rows.
Arithmetic is float64 (the result is cast back by the caller).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ActiveSetResult", "solve_active_set"]

logger = logging.getLogger(__name__)

_DEPENDENT = 1e-12  # ‖z‖² ≤ _DEPENDENT·‖c_p‖²: c_p lies in the span of the active normals


@dataclass(frozen=True)
class ActiveSetResult:
    """``x [n, K]``, row multipliers ``mu [n, m] ≥ 0`` (``x − v = −Aᵀμ − τ1 + bound terms``), GI steps
    ``iterations [n]`` and ``converged [n]`` (False: step limit, or no step possible on an empty set)."""

    x: Tensor
    mu: Tensor
    iterations: Tensor
    converged: Tensor


def solve_active_set(lo: Tensor, hi: Tensor, A: Tensor, b: Tensor, x0: Tensor, u0: Tensor,
                     max_iter: int = 50, feas_tol: float = 1e-12, round_off: float = 1e-9,
                     mu0: Tensor | None = None) -> ActiveSetResult:
    """GI from ``x0 = clamp(u0, lo, hi)``, the projection of ``v`` onto ``{Σx = 1, lo ≤ x ≤ hi, a_r·x = b_r for
    μ0_r > 0}`` with ``u0 = v − τ − Aᵀμ0`` (``mu0 [n, m] ≥ 0``, default 0: the box∩simplex projection, Σx0 = 1).
    The rows with ``μ0_r > 0`` start active and, with the bounds ``u0 ∉ [lo, hi]``, must be linearly independent.

    Shapes: ``lo, hi, x0, u0: [n, K]``, ``A: [n, m, K]``, ``b: [n, m]``. ``max_iter`` bounds the GI steps
    (adds + drops) per row; a constraint counts as violated when its slack divided by its normal's norm is below
    ``−feas_tol``. A constraint that no step can satisfy (the set is empty) but that is violated by at
    most ``round_off`` counts as round-off on a thin set: the row is reported converged and the caller verifies it.
    """
    n, m, K = A.shape
    dt, dev = torch.float64, x0.device
    lo, hi, A, b, x, u0 = (t.to(dt) for t in (lo, hi, A, b, x0, u0))
    nc = 2 * K + m
    d = torch.cat([lo, -hi, -b], dim=-1)  # c_jᵀx ≥ d_j with c = (e_i | −e_i | −a_r)
    rnorm = A.norm(dim=-1).clamp_min(1e-300)
    Gm = torch.cat([torch.ones(n, 1, K, dtype=dt, device=dev), -A], dim=1)  # Σx = 1 and the rows (≥ form)
    # initial active bounds: strictly positive multipliers (lo − u0 resp. u0 − hi) of the starting projection
    mu0 = torch.zeros(n, m, dtype=dt, device=dev) if mu0 is None else mu0.to(dt).clamp_min(0)
    act = torch.cat([u0 < lo, u0 > hi, mu0 > 0], -1)
    mult = torch.cat([(lo - u0).clamp_min(0), (u0 - hi).clamp_min(0), mu0], -1) * act
    nofree = (act[:, :K] | act[:, K:2 * K]).all(-1)
    if bool(nofree.any()):  # K bounds + Σx = 1 are dependent: release the bound with the smallest multiplier
        j = torch.where(act, mult, math.inf).argmin(-1)
        rel = torch.nn.functional.one_hot(j, nc).bool() & nofree[:, None]
        act, mult = act & ~rel, mult.masked_fill(rel, 0.0)
    x_out, mu_out = x.clone(), torch.zeros(n, m, dtype=dt, device=dev)
    it_out = torch.zeros(n, dtype=torch.long, device=dev)
    conv_out = torch.zeros(n, dtype=torch.bool, device=dev)
    rows = torch.arange(n, device=dev)
    p = torch.full((n,), -1, dtype=torch.long, device=dev)
    up = torch.zeros(n, dtype=dt, device=dev)
    sign = torch.cat([torch.ones(K, dtype=dt, device=dev), -torch.ones(K, dtype=dt, device=dev)])
    state = [d, rnorm, Gm, act, mult, x, p, up]

    def finish(sel: Tensor, k: int, ok: bool | Tensor) -> None:
        nonlocal rows, state
        idx = rows[sel]
        x_out[idx], mu_out[idx], it_out[idx] = state[5][sel], state[4][sel, 2 * K:], k
        conv_out[idx] = ok if isinstance(ok, bool) else ok[sel]
        keep = ~sel
        rows, state = rows[keep], [t[keep] for t in state]

    for k in range(max_iter + 1):
        need = state[6] < 0
        if bool(need.any()):
            d, rnorm, Gm, act, mult, x, p, up = state
            Ax = (Gm[:, 1:] * x[:, None, :]).sum(-1)  # −A x (broadcast products beat bmm for tiny matrices)
            s = torch.cat([x - d[:, :K], -x - d[:, K:2 * K], (Ax - d[:, 2 * K:]) / rnorm], -1)
            viol, jmin = torch.where(act, 0.0, s).min(-1)
            new = need & (viol < -feas_tol)
            state[6] = torch.where(new, jmin, p)
            done = need & ~new
            if bool(done.any()):
                finish(done, k, True)
                if rows.numel() == 0:
                    break
        if k == max_iter:
            finish(torch.ones_like(rows, dtype=torch.bool), k, False)
            break
        d, rnorm, Gm, act, mult, x, p, up = state
        is_row = p >= 2 * K
        a_p = Gm.gather(1, (p - 2 * K + 1).clamp_min(0)[:, None, None].expand(-1, 1, K))[:, 0]
        e_p = torch.nn.functional.one_hot(p % K, K).to(dt) * sign[p.clamp_max(2 * K - 1)][:, None]
        cp = torch.where(is_row[:, None], a_p, e_p)
        sp = (cp * x).sum(-1) - d.gather(1, p[:, None])[:, 0]
        free = ~(act[:, :K] | act[:, K:2 * K])
        actR = torch.cat([torch.ones_like(act[:, :1]), act[:, 2 * K:]], -1)
        Ga = Gm * actR[..., None]
        GF = Ga * free[:, None, :]
        M = GF @ GF.mT + torch.diag_embed((~actR).to(dt))
        y = torch.linalg.solve_ex(M, (GF * cp[:, None, :]).sum(-1, keepdim=True))[0][..., 0]
        res = cp - (Ga * y[..., None]).sum(1)  # c_p minus its part in the span of the active rows
        z = res * free
        r = torch.cat([res, -res, y[:, 1:]], -1) * act
        zz = z.square().sum(-1)
        has_z = zz > _DEPENDENT * cp.square().sum(-1)
        t2 = torch.where(has_z, -sp / torch.where(has_z, zz, 1.0), math.inf)
        pos = act & (r > 0)
        t1, l = torch.where(pos, mult / torch.where(pos, r, 1.0), math.inf).min(-1)
        stuck = torch.isinf(t1) & torch.isinf(t2)  # p cannot be satisfied: the set is empty (or thin, round-off)
        if bool(stuck.any()):
            logger.debug("active set: %d row(s) admit no step (empty set or round-off)", int(stuck.sum()))
            finish(stuck, k, sp >= -round_off)  # the caller verifies KKT
            if rows.numel() == 0:
                break
            keep = ~stuck
            d, rnorm, Gm, act, mult, x, p, up = state
            z, r, t1, t2, l, has_z = z[keep], r[keep], t1[keep], t2[keep], l[keep], has_z[keep]
        full = t2 <= t1
        t = torch.minimum(t1, t2)
        x = x + torch.where(has_z, t, 0.0)[:, None] * z
        mult = torch.where(act, (mult - t[:, None] * r).clamp_min(0), mult)
        up = up + t
        hot = torch.nn.functional.one_hot(torch.where(full, p, l), nc).bool()
        act = torch.where(full[:, None], act | hot, act & ~hot)
        mult = torch.where(hot, torch.where(full, up, 0.0)[:, None], mult)
        state = [d, rnorm, Gm, act, mult, x, torch.where(full, -1, p), torch.where(full, 0.0, up)]
    return ActiveSetResult(x_out, mu_out, it_out, conv_out)
