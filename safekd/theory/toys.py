"""Small float64 building blocks shared by the theorem harnesses (random teachers, KL, ridge-logit optimum)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DTYPE = torch.float64


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (every harness draws only from its own generator)."""
    return torch.Generator().manual_seed(seed)


def random_logprobs(*shape: int, scale: float, gen: torch.Generator) -> Tensor:
    """log softmax(scale · N(0, I)) over the last axis: random strictly positive distributions."""
    return torch.log_softmax(scale * torch.randn(*shape, generator=gen, dtype=DTYPE), dim=-1)


def kl(q_logp: Tensor, p_logp: Tensor) -> Tensor:
    """KL(q‖p) = Σ_v q_v (log q_v − log p_v) over the last axis, with 0·log 0 = 0."""
    q = q_logp.exp()
    return torch.where(q > 0, q * (q_logp - p_logp), torch.zeros_like(q)).sum(-1)


def cross_entropy(q: Tensor, logits: Tensor) -> Tensor:
    """CE(q, softmax z) = −Σ_v q_v log softmax(z)_v over the last axis."""
    return -(q * torch.log_softmax(logits, dim=-1)).sum(-1)


def softmax_weights(scores: Tensor, beta: float, eps: float) -> Tensor:
    """Conforming operator (the softmax template): w = (1−ε)·softmax(β·g) + ε/K over the last axis."""
    k = scores.shape[-1]
    return (1.0 - eps) * torch.softmax(beta * scores, dim=-1) + eps / k


def ridge_logit_optimum(q: Tensor, mu: float, *, tol: float = 1e-13, max_iter: int = 200) -> Tensor:
    """argmin_z CE(q, softmax z) + (μ/2)‖z‖² per row of ``q`` [..., V], by damped Newton.

    Optimality: softmax(z) − q + μ z = 0; Hessian diag(p) − p pᵀ + μI ⪰ μI (μ-strong convexity).
    """
    z = torch.zeros_like(q)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    for _ in range(max_iter):
        p = torch.softmax(z, dim=-1)
        grad = p - q + mu * z
        if grad.abs().max() <= tol:
            break
        hess = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2) + mu * eye
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        decrement = (grad * step).sum(-1, keepdim=True).clamp_min(0).sqrt()
        z = z - step / (1.0 + decrement)
    return z


def ridge_logit_objective(q: Tensor, z: Tensor, mu: float) -> Tensor:
    """F(z) = CE(q, softmax z) + (μ/2)‖z‖² per row."""
    return cross_entropy(q, z) + 0.5 * mu * (z * z).sum(-1)


def loglog_slope(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Least-squares slope of log y against log x."""
    lx = np.log(np.asarray(x, dtype=np.float64))
    ly = np.log(np.asarray(y, dtype=np.float64))
    return float(np.polyfit(lx, ly, 1)[0])


def random_simplex(*shape: int, scale: float, gen: torch.Generator) -> Tensor:
    """softmax(scale · N(0, I)) over the last axis."""
    return torch.softmax(scale * torch.randn(*shape, generator=gen, dtype=DTYPE), dim=-1)
