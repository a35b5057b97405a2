"""Exact projection onto the ordered simplex cut by one active halfspace, by enumerating block structures (small K).

Coordinates in chain order; ``C = {Σx = 1, x ≥ 0, x_1 ≥ x_2 ≥ … ≥ x_K}``. The projection of ``v`` onto ``C`` is
``max(iso(v) − τ, 0)``: a prefix ``1..L`` of positive coordinates split into blocks of equal value, then a zero
tail. Onto ``C ∩ {a·x ≤ β}`` for a row that ``P_C(v)`` violates (so it is active at the solution) it is
``max(iso(v − λa) − τ, 0)`` with ``λ ≥ 0`` and ``a·x = β``. For a fixed structure (a composition of ``L`` into
blocks) everything is affine in ``(v, a)`` and in ``λ``: block values ``c_B = mean_B(v − λa) − τ`` with ``τ``
fixed by ``Σx = 1``, the row value ``g(λ) = a·x(λ) − β`` and the KKT multipliers of the chain rows, running sums
of ``x − v + λa + τ`` along a block, or along the tail (there they end in the lower-bound multiplier ``ν`` of
the last coordinate: pinning the tail by its chain rows and that one bound keeps the active normals
independent). With the row, ``λ`` is the root of ``g``, or where ``g`` is flat (e.g. a single positive block on
a set relaxed to one point) the least ``λ ≥ 0`` keeping every multiplier ≥ 0. The KKT point is unique, so the
first structure passing every primal and dual check is the projection. There are ``2^K − 1`` structures; the
maps are precomputed per ``K`` and the whole search is a few batched products (no iteration): meant for
small ``K`` (:mod:`solvers.projection` uses it up to ``K = 5``).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["project_ordered_halfspace"]


@functools.lru_cache(maxsize=32)
def _maps(K: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per structure ``c`` (prefix length ``L_c``, blocks ``B``): ``x0 = v @ T + e`` and chain multipliers
    ``μ0 = v @ W + w0`` at ``λ = 0`` (``T, W: [K, C·K]``; ``e, w0: [C, K]``), the ``x``- and ``μ``-slopes in ``λ``
    being ``−a @ T`` and ``−a @ W``; ``dual [C, K]`` marks the entries of ``μ`` that must be ≥ 0 (pairs inside a
    block or inside the tail, and the tail's bound multiplier ``ν`` at position ``K``) and ``joint [C, K−1]`` the
    chain pairs that carry a multiplier."""
    ids, lengths = [], []
    for L in range(1, K + 1):
        for cuts in range(2 ** (L - 1)):  # bit j set: a block ends after position j (j < L − 1)
            row, blk = [], 0
            for k in range(L):
                row.append(blk)
                if k < L - 1 and cuts >> k & 1:
                    blk += 1
            ids.append(row + [-1] * (K - L))  # -1: the zero tail
            lengths.append(L)
    B = torch.tensor(ids, dtype=torch.float64)  # [C, K]
    C = B.shape[0]
    L = torch.tensor(lengths, dtype=torch.float64)[:, None]  # [C, 1]
    pos = torch.arange(K, dtype=torch.float64)
    head = (pos[None, :] < L).double()  # [C, K]: positive prefix
    same = (B[:, :, None] == B[:, None, :]).double() * head[:, :, None] * head[:, None, :]  # [C, j, k]
    size = same.sum(1, keepdim=True).clamp_min(1)
    # x0_k = Σ_j v_j ([j ~ k]/|B(k)| − [j < L]/L) + [k < L]/L on the prefix, 0 on the tail
    T = (same / size - head[:, :, None] * head[:, None, :] / L[:, :, None]).permute(1, 0, 2)  # [j, C, k]
    e = head / L
    # residues r0 = x0 − v + τ0 (τ0 = (Σ_{j<L} v_j − 1)/L) and their running sums over each segment
    eye = torch.eye(K, dtype=torch.float64)
    R = T - eye[:, None, :] + (head / L).T[:, :, None]  # [j, C, l]
    r_const = e - 1.0 / L  # [C, l]
    seg = torch.where(B < 0, float(K), B)  # the tail is one more segment
    S = ((seg[:, :, None] == seg[:, None, :]) & (pos[None, None, :] <= pos[None, :, None])).double()  # [C, k, l]
    W = torch.einsum("jcl,ckl->jck", R, S)
    w0 = torch.einsum("cl,ckl->ck", r_const, S)
    joint = seg[:, 1:] == seg[:, :-1]
    dual = torch.cat([joint, (L[:, 0] < K)[:, None]], dim=-1)
    TW = torch.cat([T.reshape(K, C * K), W.reshape(K, C * K)], dim=1)
    return (TW.to(device=device, dtype=dtype), e.to(device=device, dtype=dtype), w0.to(device=device, dtype=dtype),
            dual.to(device), joint.to(device))


def project_ordered_halfspace(v: Tensor, a: Tensor, beta: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Projection of ``v [n, K]`` (chain order) onto ``C ∩ {a·x ≤ β}`` where the row is active (``a [n, K]``,
    ``beta [n]``). Returns ``(x [n, K], λ [n], μ [n, K−1], found [n])``: ``λ`` the multiplier of the row, ``μ_k``
    that of ``x_{k+1} − x_k ≤ 0`` (in the zero tail: running sums pinning it to the last coordinate); ``found``
    False where no structure passed (an empty set, or round-off on a degenerate row): the caller falls back, and
    verifies the rest."""
    n, K = v.shape
    TW, e, w0, dual, joint = _maps(K, v.dtype, v.device)
    C = e.shape[0]
    P, Q = (v @ TW).view(n, 2, C, K), (a @ TW).view(n, 2, C, K)
    x0, mu0, x1, mu1 = P[:, 0] + e, P[:, 1] + w0, -Q[:, 0], -Q[:, 1]
    g0 = (a[:, None, :] * x0).sum(-1) - beta[:, None]  # a·x(λ) − β = g0 + λ g1, [n, C]
    g1 = (a[:, None, :] * x1).sum(-1)  # ≤ 0 (Cauchy–Schwarz); 0: x does not move with λ
    t = tol * (1.0 + v.abs().amax(-1, keepdim=True))
    flat = g1 > -t
    need = dual & (mu1 > t[..., None])  # multipliers growing with λ bound it from below (round-off slopes do not)
    lam_flat = torch.where(need, -mu0 / torch.where(need, mu1, 1.0), 0.0).amax(-1).clamp_min(0)
    lam = torch.where(flat, lam_flat, -g0 / torch.where(flat, -1.0, g1))  # [n, C]
    x = x0 + lam[..., None] * x1
    mu = mu0 + lam[..., None] * mu1
    ok = ((x[..., :-1] - x[..., 1:]).amin(-1) >= -t) & (x[..., -1] >= -t)  # nonincreasing, ≥ 0
    ok &= (lam >= -t) & (torch.where(dual, mu, 0.0).amin(-1) >= -t) & ((g0 + lam * g1).abs() <= t)
    pick = ok.to(torch.uint8).argmax(-1)  # the first passing structure
    rows = torch.arange(n, device=v.device)
    mu_out = torch.where(joint[pick], mu[rows, pick, :-1], 0.0).clamp_min(0)  # round-off: −1e-18 → 0
    return x[rows, pick], lam[rows, pick].clamp_min(0), mu_out, ok.any(-1)
