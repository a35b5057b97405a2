"""Batched decreasing isotonic regression along a chain, with its multipliers (no Python loop over rows).

``iso(y) = argmin_x ½‖x − y‖²`` s.t. ``x_k ≥ x_{k+1}`` for every *linked* consecutive pair (``links[k]``; an unlinked
pair splits the chain into independent segments). Closed form (min–max formula, per segment):
``iso_i = min_{j≤i} max_{k≥i} mean(y_j..y_k)`` over ``j, k`` in the segment of ``i``, evaluated with cumulative sums on
an ``[n, K, K]`` mean matrix (the batch is chunked to bound memory). The blocks (maximal runs of equal fitted value)
are then re-averaged exactly, and the multipliers of the rows ``x_{k+1} − x_k ≤ 0`` follow from stationarity
``x − y + Σ_k μ_k (e_{k+1} − e_k) = 0``: ``μ_k = Σ_{l≤k} (iso_l − y_l)`` (≥ 0, zero at block ends).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

__all__ = ["block_means", "isotonic_decreasing"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 21  # rows per chunk · K²: bounds the [n, K, K] mean matrix (~16 MiB in float64)


def _minmax(y: Tensor, seg: Tensor) -> Tensor:
    """Min–max formula on one chunk: ``y [n, K]``, segment ids ``seg [n, K]`` (nondecreasing) → ``[n, K]``."""
    n, K = y.shape
    S = torch.cat([y.new_zeros(n, 1), y.cumsum(-1)], dim=-1)
    idx = torch.arange(K, device=y.device)
    length = (idx[None, :] - idx[:, None] + 1).to(y.dtype)  # [j, k] → k − j + 1
    mean = (S[:, None, 1:] - S[:, :-1, None]) / length.clamp_min(1)  # [n, j, k] = mean(y_j..y_k)
    valid = (idx[:, None] <= idx[None, :]) & (seg[:, :, None] == seg[:, None, :])  # j ≤ k, same segment
    mean = mean.masked_fill(~valid, -torch.inf)
    tail_max = mean.flip(-1).cummax(-1).values.flip(-1)  # [n, j, i] = max_{k ≥ i} mean(j..k)
    return tail_max.masked_fill(~valid, torch.inf).amin(-2)  # min over j ≤ i in the segment


def _run_ids(joined: Tensor) -> Tensor:
    """Ids ``[n, K]`` (0, 1, … along each row) of the maximal runs of consecutive entries joined by ``joined [n, K−1]``."""
    return torch.cat([torch.zeros_like(joined[:, :1], dtype=torch.long), (~joined).long().cumsum(-1)], dim=-1)


def block_means(x: Tensor, same: Tensor) -> Tensor:
    """Replace ``x [n, K]`` by its mean over each block of consecutive entries joined by ``same [n, K−1]``."""
    n, K = x.shape
    block = _run_ids(same)
    flat = (block + K * torch.arange(n, device=x.device)[:, None]).reshape(-1)
    total = x.new_zeros(n * K).index_add_(0, flat, x.reshape(-1))
    count = x.new_zeros(n * K).index_add_(0, flat, torch.ones_like(x).reshape(-1))
    return (total / count.clamp_min(1))[flat].reshape(n, K)


def isotonic_decreasing(y: Tensor, links: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Decreasing isotonic regression of ``y [n, K]`` along its last axis, with ``links [n, K−1]`` (bool) marking
    the constrained consecutive pairs. Returns ``(iso [n, K], mu [n, K−1] ≥ 0, same [n, K−1])``: ``mu`` the
    multipliers of the rows ``x_{k+1} − x_k ≤ 0`` (0 for unlinked pairs), ``same`` the pairs inside one block."""
    n, K = y.shape
    if links.shape != (n, max(K - 1, 0)):
        raise ValueError(f"links must have shape [n={n}, K-1={K - 1}], got {tuple(links.shape)}")
    if K == 1 or n == 0:
        return y.clone(), y.new_zeros(n, max(K - 1, 0)), links.clone()
    shift = y.amax(-1, keepdim=True)
    y = y - shift  # iso is shift-equivariant; the shift keeps the cumulative sums small
    seg = _run_ids(links)
    step = max(1, _CHUNK_ELEMENTS // (K * K))
    iso = torch.cat([_minmax(y[i:i + step], seg[i:i + step]) for i in range(0, n, step)], dim=0)
    # blocks: linked pairs whose fitted values agree up to round-off; re-average each block exactly
    scale = y.abs().amax(-1, keepdim=True).clamp_min(1.0)
    same = links & ((iso[:, :-1] - iso[:, 1:]).abs() <= 8 * K * torch.finfo(y.dtype).eps * scale)
    iso = block_means(y, same)
    mu = (iso - y).cumsum(-1)[:, :-1]
    mu = torch.where(same, mu.clamp_min(0), torch.zeros_like(mu))
    return iso + shift, mu, same
