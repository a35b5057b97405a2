"""AEKD: min-norm point of the teachers' logit-space KD gradients on a capped simplex (Du et al., NeurIPS 2020)."""
from __future__ import annotations

import itertools
import logging
import math

import torch
from torch import Tensor

from solvers import FeasibleSet, project

from safekd.targets.signals import Signals
from safekd.targets.weighting.base import WeightOperator
from safekd.targets.weighting.token import LOGP_FLOOR

logger = logging.getLogger(__name__)

__all__ = ["AEKD", "kd_logit_gradients", "capped_min_norm", "capped_min_norm_exact"]


def kd_logit_gradients(teacher_logp: Tensor, student_logits: Tensor, divergence: str = "forward") -> Tensor:
    """Closed-form ``∂/∂z_s`` of each teacher's KD loss, ``[..., K, V]`` (τ=1):
    forward ``KL(p_k‖q)``: ``q − p_k``; reverse ``KL(q‖p_k)``: ``q ⊙ (log q − log p_k − KL(q‖p_k))``.
    """
    lq = torch.log_softmax(student_logits, dim=-1).unsqueeze(-2)
    q = lq.exp()
    if divergence == "forward":
        return q - teacher_logp.exp()
    if divergence == "reverse":
        d = lq - teacher_logp.clamp_min(LOGP_FLOOR)
        return q * (d - (q * d).sum(-1, keepdim=True))
    raise ValueError(f"divergence must be 'forward' or 'reverse', got {divergence!r}")


def _frank_wolfe_gap(grad: Tensor, alpha: Tensor, cap: float) -> Tensor:
    """``max_{s ∈ Δ_K, s ≤ cap} ⟨grad, α − s⟩ ≥ f(α) − f*`` (linear minimisation: fill the smallest
    gradient coordinates up to ``cap`` in order)."""
    K = grad.shape[-1]
    order = grad.argsort(dim=-1)
    pos = torch.arange(K, dtype=grad.dtype, device=grad.device)
    fill = (1.0 - cap * pos).clamp(0.0, cap)
    s = torch.zeros_like(grad).scatter(-1, order, fill.expand_as(grad))
    return (grad * (alpha - s)).sum(-1)


def _check_cap(gram: Tensor, cap: float) -> int:
    """``K`` of ``gram [..., K, K]``; raises unless the capped simplex is non-empty (``1/K ≤ cap ≤ 1``)."""
    K = gram.shape[-1]
    if not 1.0 / K - 1e-12 <= cap <= 1.0:
        raise ValueError(f"cap must lie in [1/K, 1] = [{1.0 / K:.4g}, 1], got {cap}")
    return K


def capped_min_norm(gram: Tensor, cap: float, max_iter: int = 500, tol: float = 1e-8) -> Tensor:
    """``argmin_α αᵀGα`` over ``{α ∈ Δ_K, α_k ≤ cap}``, batched over ``gram [..., K, K]`` (PSD).

    FISTA (with per-row adaptive restart) with step ``1/(2λ_max)`` and the exact Euclidean projection
    `solvers.project` onto the capped simplex, started at the uniform point (so the result is
    permutation-equivariant); stops when the Frank–Wolfe duality gap (an upper bound on the objective
    error) is ≤ ``tol`` in every row.
    """
    K = _check_cap(gram, cap)
    G = gram.to(torch.float64)
    zeros = torch.zeros(K, dtype=G.dtype, device=G.device)
    fset = FeasibleSet(zeros, torch.full_like(zeros, cap), zeros.new_zeros(0, K), zeros.new_zeros(0), ())
    L = (2.0 * torch.linalg.eigvalsh(G)[..., -1]).clamp_min(1e-12).unsqueeze(-1)
    alpha = torch.full(G.shape[:-1], 1.0 / K, dtype=G.dtype, device=G.device)
    y, t = alpha, 1.0
    for _ in range(max_iter):
        grad_a = 2.0 * (G @ alpha.unsqueeze(-1)).squeeze(-1)
        if alpha.numel() == 0 or bool((_frank_wolfe_gap(grad_a, alpha, cap) <= tol).all()):
            break
        grad = 2.0 * (G @ y.unsqueeze(-1)).squeeze(-1)
        new = project(y - grad / L, fset)
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        momentum = ((t - 1.0) / t_new) * (new - alpha)
        # gradient-based adaptive restart (O'Donoghue & Candès 2015), per row
        restart = ((y - new) * (new - alpha)).sum(-1, keepdim=True) > 0
        y = new + torch.where(restart, torch.zeros_like(momentum), momentum)
        alpha, t = new, (1.0 if bool(restart.all()) else t_new)
    else:
        logger.debug("capped_min_norm: duality gap above %.1e after max_iter=%d", tol, max_iter)
    return alpha.to(gram.dtype)


def capped_min_norm_exact(gram: Tensor, cap: float) -> Tensor:
    """Exact ``argmin_α αᵀGα`` over ``{α ∈ Δ_K, α_k ≤ cap}`` by enumerating the 3^K active sets (K ≤ 6).

    For each pattern (α_k = 0 / free / = cap) the KKT system ``2(Gα)_F = λ, Σα = 1`` is solved with a
    pseudo-inverse (consistent singular systems included); the feasible candidates of least objective are
    averaged, which keeps the result permutation-equivariant when the minimiser is not unique.
    """
    K = _check_cap(gram, cap)
    G = gram.to(torch.float64)
    codes = torch.tensor(list(itertools.product((0, 1, 2), repeat=K)), device=G.device)  # [P, K]
    free = (codes == 1).to(G.dtype)
    fixed_val = (codes == 2).to(G.dtype) * cap
    P = codes.shape[0]
    M = G.new_zeros(*G.shape[:-2], P, K + 1, K + 1)
    eye = torch.eye(K, dtype=G.dtype, device=G.device)
    # free rows: 2 G_k· α − λ = 0 ; fixed rows: α_k = value ; last row: Σ α = 1
    rows = free[:, :, None] * 2.0 * G.unsqueeze(-3) + (1.0 - free)[:, :, None] * eye
    M[..., :K, :K] = rows
    M[..., :K, K] = -free
    M[..., K, :K] = 1.0
    r = G.new_zeros(*G.shape[:-2], P, K + 1)
    r[..., :K] = fixed_val
    r[..., K] = 1.0
    x = (torch.linalg.pinv(M) @ r.unsqueeze(-1)).squeeze(-1)[..., :K]
    ok = (x >= -1e-9).all(-1) & (x <= cap + 1e-9).all(-1) & ((x.sum(-1) - 1.0).abs() <= 1e-9)
    obj = ((x.unsqueeze(-2) @ G.unsqueeze(-3)).squeeze(-2) * x).sum(-1)
    obj = torch.where(ok, obj, torch.full_like(obj, math.inf))
    best = obj.amin(-1, keepdim=True)
    near = (obj <= best + 1e-10 * (1.0 + best.abs())).to(G.dtype)
    alpha = (near.unsqueeze(-1) * x).sum(-2) / near.sum(-1, keepdim=True)
    alpha = alpha.clamp(0.0, cap)
    return (alpha / alpha.sum(-1, keepdim=True)).to(gram.dtype)


class AEKD(WeightOperator):
    """AEKD (Du et al., "Agree to Disagree", NeurIPS 2020) with closed-form logit gradients:

    ``g_k = ∂KD_k/∂z_s`` (per token, or masked batch mean with ``reduce="batch"``), ``ĝ_k = g_k/‖g_k‖``,
    ``α* = argmin_{α∈Δ_K, α_k≤C} ‖Σ_k α_k ĝ_k‖²`` (Gram ``Ĝ = ĝĝᵀ``), ``w ∝ α*_k/‖g_k‖``; then the template
    with ``scores = log w`` (β=1, ε=0 gives w). ``C = 1`` is MGDA's min-norm point, ``C = 1/K`` uniform.
    ``solver="auto"`` enumerates active sets exactly for K ≤ 4 and runs FISTA + `solvers.project` above.
    Weights are computed without gradient (they are detached, as in the paper). Declares only ``w_min = ε/K``.
    """

    requires = frozenset({"teacher_logprobs", "student_logits"})
    depends_on_student = True

    def __init__(self, cap: float = 1.0, divergence: str = "forward", reduce: str = "token",
                 beta: float = 1.0, epsilon: float = 0.0, solver: str = "auto", max_iter: int = 500) -> None:
        if divergence not in ("forward", "reverse"):
            raise ValueError(f"divergence must be 'forward' or 'reverse', got {divergence!r}")
        if reduce not in ("token", "batch"):
            raise ValueError(f"reduce must be 'token' or 'batch', got {reduce!r}")
        if solver not in ("auto", "exact", "fista"):
            raise ValueError(f"solver must be 'auto', 'exact' or 'fista', got {solver!r}")
        if not 0 < cap <= 1:
            raise ValueError(f"cap must lie in (0, 1], got {cap}")
        super().__init__(beta=beta, epsilon=epsilon)
        self.cap, self.divergence, self.reduce, self.max_iter = float(cap), divergence, reduce, max_iter
        self.solver = solver

    @torch.no_grad()
    def raw_weights(self, s: Signals) -> Tensor:
        """The AEKD weights ``w ∝ α*/‖g‖`` ``[..., K]`` before the β/ε template."""
        lp = s.logprobs()
        g = kd_logit_gradients(lp, s.student_logits, self.divergence)
        batch = lp.shape[:-2]
        if self.reduce == "batch":
            keep = torch.ones(batch, dtype=g.dtype, device=g.device) if s.mask is None else s.mask.to(g.dtype)
            keep = keep.expand(batch).reshape(-1, 1, 1)
            g = (g.reshape(-1, *g.shape[-2:]) * keep).sum(0) / keep.sum().clamp_min(1.0)
        gram = g @ g.transpose(-1, -2)
        norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        scale = norms.amax(-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        n = norms.clamp_min(1e-12 * scale)
        unit_gram = gram / (n.unsqueeze(-1) * n.unsqueeze(-2))
        K = unit_gram.shape[-1]
        if self.solver == "exact" or (self.solver == "auto" and K <= 4):
            alpha = capped_min_norm_exact(unit_gram, self.cap)
        else:
            alpha = capped_min_norm(unit_gram, self.cap, self.max_iter)
        w = alpha / n
        w = w / w.sum(-1, keepdim=True)
        return w.expand(*batch, w.shape[-1]) if self.reduce == "batch" else w

    def scores(self, s: Signals) -> Tensor:
        return torch.log(self.raw_weights(s)).clamp_min(LOGP_FLOOR)

    def lipschitz_wrt(self) -> tuple[str, ...]:
        return ("teacher_logits", "student_logits")
