"""Exact projection onto an ordered simplex cut by one halfspace, by enumerating block structures (small K).

``P(v) = argmin ½‖x − v‖²`` over ``{Σx = 1, x ≥ 0, x_1 ≥ x_2 ≥ … ≥ x_K, a·x ≤ β}`` (coordinates in chain order)
for rows whose projection onto the ordered simplex alone violates the halfspace, so that it is active at the
solution: ``x = max(iso(v − λa) − τ, 0)`` with ``λ ≥ 0`` and ``a·x = β``, a prefix ``1..L`` of positive
coordinates split into blocks of equal value, then a zero tail. For a fixed structure (a composition of ``L``
into blocks) everything is affine in ``λ``: block values ``c_B(λ) = mean_B(v − λa) − τ(λ)`` with ``τ`` fixed by
``Σx = 1``, the row value ``g(λ) = a·x(λ) − β`` and the KKT multipliers (chain rows: running sums of
``x − v + λa + τ`` along a block, or along the tail where they end in the lower-bound multiplier of the last
coordinate). ``λ`` is the root of ``g``, or where ``g`` is flat (e.g. a single positive block on a set relaxed to
one point) the least ``λ ≥ 0`` keeping every multiplier ≥ 0. The KKT point is unique, so the first structure
passing every primal and dual check is the projection. There are ``2^K − 1`` structures: the kernel is meant
for ``K ≤ 6`` and is one batched pass (no iteration).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["project_ordered_halfspace"]


@functools.lru_cache(maxsize=16)
def _structures(K: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For every structure: block one-hots ``M [C, K, K]`` (block slot × position; tail positions in no slot),
    prefix length ``L [C]``, running-sum operator ``S [C, K, K]`` (``S[c, k, l] = 1`` for ``l ≤ k`` in the same
    block, or both in the tail) and ``joint [C, K−1]`` (pair ``k, k+1`` inside one block or both in the tail)."""
    blocks, lengths = [], []
    for L in range(1, K + 1):
        for cuts in range(2 ** (L - 1)):  # bit j set: a block ends after position j (j < L − 1)
            ids, b = [], 0
            for k in range(L):
                ids.append(b)
                if k < L - 1 and cuts >> k & 1:
                    b += 1
            blocks.append(ids + [-1] * (K - L))  # -1: tail
            lengths.append(L)
    ids = torch.tensor(blocks)
    M = (ids[:, None, :] == torch.arange(K)[None, :, None]).double()
    seg = torch.where(ids < 0, K, ids)  # the tail is one more segment for the running sums
    pos = torch.arange(K)
    S = ((seg[:, :, None] == seg[:, None, :]) & (pos[None, None, :] <= pos[None, :, None])).double()
    joint = seg[:, 1:] == seg[:, :-1]
    return M, torch.tensor(lengths, dtype=torch.float64), S, joint


def project_ordered_halfspace(v: Tensor, a: Tensor, beta: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Projection of ``v [n, K]`` (chain order) onto ``{Σx = 1, x ≥ 0, x_1 ≥ … ≥ x_K, a·x ≤ β}`` where the row is
    active (``a [n, K]``, ``beta [n]``, float64). Returns ``(x [n, K], λ [n], μ [n, K−1], found [n])``: ``μ_k``
    the multiplier of ``x_{k+1} − x_k ≤ 0``, ``λ`` that of the halfspace; ``found`` False where no structure
    passed (an empty set, or round-off on a degenerate row): the caller falls back, and verifies the rest."""
    n, K = v.shape
    M, L, S, joint = (t.to(v.device) for t in _structures(K))
    C = M.shape[0]
    sz = M.sum(-1)  # [C, K] block sizes (0: unused slot)
    inv = torch.where(sz > 0, 1.0 / sz.clamp_min(1), 0.0)
    Mt = M.permute(2, 0, 1).reshape(K, C * K)  # position × (structure, slot)
    Sv, Sa = (v @ Mt).view(n, C, K), (a @ Mt).view(n, C, K)  # block sums
    tau0, tau1 = (Sv.sum(-1) - 1) / L, -Sa.sum(-1) / L  # τ(λ) = τ0 + λ τ1, [n, C]
    used = (sz > 0).to(v.dtype)
    c0, c1 = Sv * inv - tau0[..., None] * used, -Sa * inv - tau1[..., None] * used  # block values c0 + λ c1
    g0 = (Sa * c0).sum(-1) - beta[:, None]  # a·x(λ) − β = g0 + λ g1
    g1 = (Sa * c1).sum(-1)  # ≤ 0 (Cauchy–Schwarz); 0: x does not move with λ
    scale = 1.0 + v.abs().amax(-1, keepdim=True)
    t = tol * scale
    flat = g1 > -t
    x0, x1 = torch.einsum("ncb,cbk->nck", c0, M), torch.einsum("ncb,cbk->nck", c1, M)  # [n, C, K] (tail 0)
    r0 = x0 - v[:, None, :] + tau0[..., None]  # stationarity residues x − (v − λa) + τ, affine in λ
    r1 = x1 + a[:, None, :] + tau1[..., None]
    mu0, mu1 = torch.einsum("ckl,ncl->nck", S, r0), torch.einsum("ckl,ncl->nck", S, r1)  # running sums
    # dual quantities ≥ 0: the multipliers of joint pairs and the tail's bound multiplier (its sum at position K)
    dual = torch.cat([joint, (L < K)[:, None]], dim=-1)  # [C, K]
    need = dual & (mu1 > 0)
    lam_flat = torch.where(need, -mu0 / torch.where(need, mu1, 1.0), 0.0).amax(-1).clamp_min(0)
    lam = torch.where(flat, lam_flat, -g0 / torch.where(flat, -1.0, g1))  # [n, C]
    x = x0 + lam[..., None] * x1
    mu = mu0 + lam[..., None] * mu1
    ok = ((x[..., :-1] - x[..., 1:]).amin(-1) >= -t) & (x[..., -1] >= -t) & (lam >= -t)
    ok &= (torch.where(dual, mu, 0.0).amin(-1) >= -t) & ((g0 + lam * g1).abs() <= t)
    found = ok.any(-1)
    pick = ok.to(torch.uint8).argmax(-1)
    rows = torch.arange(n, device=v.device)
    mu_out = torch.where(joint[pick], mu[rows, pick, :-1], 0.0).clamp_min(0)  # round-off: −1e-18
    return x[rows, pick], lam[rows, pick].clamp_min(0), mu_out, found
