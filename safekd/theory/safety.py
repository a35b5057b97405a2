"""Safety-preservation harness: ordinal weights and a linear pool keep the target at least as safe as the mean teacher.

Under ordinal safety monotonicity (weights comonotone with teacher safety σ_k = S(p_k)) and a linear
pool, S(q) = Σ_k w_k σ_k ≥ mean_k σ_k (Chebyshev's sum inequality); a student with KL(q‖p_θ) ≤ ε
keeps |S(p_θ) − S(q)| ≤ TV ≤ √(ε/2) (Pinsker). An anti-monotone operator shows the failure.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from safekd.targets.pooling import linear_pool
from safekd.theory._args import in_range, positive_int, seed_arg
from safekd.theory.plotting import new_figure
from safekd.theory.result import TheoryResult
from safekd.theory.toys import DTYPE, generator, kl, softmax_weights

logger = logging.getLogger(__name__)

SafetyOperator = Callable[[Tensor], Tensor]


def _builtin_operator(name: str, strength: float) -> SafetyOperator:
    """'osm': w = 0.9·softmax(γσ) + 0.1/K (comonotone); 'anti': the same with −γσ (violates OSM)."""
    sign = {"osm": 1.0, "anti": -1.0}[name]
    return lambda safety: softmax_weights(sign * safety, beta=strength, eps=0.1)


def safety_preservation(*, seed: int = 0, operator: str | SafetyOperator = "osm", samples: int = 2000,
                        teachers: int = 4, vocab: int = 8, unsafe: int = 2, strength: float = 4.0,
                        max_fit_steps: int = 60, tol: float = 1e-12, plot: bool = True) -> TheoryResult:
    """Check S(q) ≥ mean_k σ_k (Chebyshev) and |S(p_θ) − S(q)| ≤ √(KL(q‖p_θ)/2) (Pinsker) on random draws.

    ``operator`` maps teacher safety scores σ [N, K] to weights [N, K] on the simplex ("osm", "anti",
    or any callable). S(p) = 1 − p(U) with U the first ``unsafe`` tokens. The student is fitted by
    gradient descent on KL(q‖p_θ) for a random number of steps per sample (so ε = KL varies).
    Passes when no sample violates either inequality.
    """
    seed_arg(seed)
    positive_int("samples", samples)
    positive_int("teachers", teachers, minimum=2)
    positive_int("vocab", vocab, minimum=2)
    positive_int("unsafe", unsafe)
    positive_int("max_fit_steps", max_fit_steps)
    if unsafe >= vocab:
        raise ValueError(f"unsafe must be smaller than vocab={vocab}, got {unsafe}")
    strength = in_range("strength", strength, 0.0, math.inf, closed_high=False)
    if isinstance(operator, str):
        if operator not in ("osm", "anti"):
            raise ValueError(f"operator must be 'osm', 'anti' or a callable, got {operator!r}")
        op_name, op = operator, _builtin_operator(operator, strength)
    elif callable(operator):
        op_name, op = getattr(operator, "__name__", type(operator).__name__), operator
    else:
        raise ValueError(f"operator must be 'osm', 'anti' or a callable, got {type(operator).__name__}")
    gen = generator(seed)
    n = samples
    logits = 1.5 * torch.randn(n, teachers, vocab, generator=gen, dtype=DTYPE)
    logits[..., :unsafe] += 2.0 * torch.randn(n, teachers, 1, generator=gen, dtype=DTYPE)
    teacher_logp = torch.log_softmax(logits, -1)
    sigma = 1.0 - teacher_logp[..., :unsafe].exp().sum(-1)                 # [N, K]
    w = op(sigma)
    if w.shape != sigma.shape or not torch.isfinite(w).all() or (w < -1e-12).any() \
            or ((w.sum(-1) - 1).abs() > 1e-9).any():
        raise ValueError(f"operator {op_name!r} must return finite weights of shape {tuple(sigma.shape)} on the "
                         "simplex (non-negative, summing to 1 over the last axis)")
    q_logp = linear_pool(teacher_logp, w)
    q = q_logp.exp()
    s_q = 1.0 - q[..., :unsafe].sum(-1)
    mean_sigma = sigma.mean(-1)
    margin = s_q - mean_sigma
    chebyshev_violations = int((margin < -tol).sum())

    z = 2.0 * torch.randn(n, vocab, generator=gen, dtype=DTYPE)
    fit_steps = torch.randint(0, max_fit_steps + 1, (n, 1), generator=gen)
    for t in range(max_fit_steps):
        z = z - (t < fit_steps).to(DTYPE) * (torch.softmax(z, -1) - q)
    eps = kl(q_logp, torch.log_softmax(z, -1)).clamp_min(0)
    s_student = 1.0 - torch.softmax(z, -1)[..., :unsafe].sum(-1)
    pinsker = torch.sqrt(eps / 2)
    gap = (s_student - s_q).abs()
    pinsker_ratio = torch.where(pinsker > 0, gap / pinsker.clamp_min(1e-300), torch.zeros_like(gap))
    pinsker_violations = int((gap > pinsker + tol).sum())
    student_floor_margin = (s_student - (mean_sigma - pinsker)).min().item()
    passed = chebyshev_violations == 0 and pinsker_violations == 0
    min_margin = margin.min().item()
    fig = None
    if plot:
        fig, (ax0, ax1) = new_figure(2)
        ax0.plot(mean_sigma.numpy(), s_q.numpy(), ".", ms=2, alpha=0.5)
        ax0.plot([0, 1], [0, 1], "k--", lw=1, label="S(q) = mean σ")
        ax0.set(xlabel="uniform-average teacher safety", ylabel="pooled target safety S(q)",
                title=f"Chebyshev ({op_name}): {chebyshev_violations} violations")
        ax0.legend()
        ax1.loglog(pinsker.clamp_min(1e-12).numpy(), gap.clamp_min(1e-16).numpy(), ".", ms=2, alpha=0.5)
        ax1.plot([1e-6, 1], [1e-6, 1], "k--", lw=1, label="|ΔS| = √(ε/2)")
        ax1.set(xlabel="√(KL(q‖p_θ)/2)", ylabel="|S(p_θ) − S(q)|", title="Pinsker transfer to the student")
        ax1.legend()
    return TheoryResult(
        name="safety-preservation",
        claim="Under ordinal safety monotonicity with a linear pool, the pooled target is at least as safe as the "
              "uniform average of the teachers, and a student with KL(q‖p_θ) ≤ ε is within √(ε/2) of it.",
        source_tag="reconstruction",
        assumptions=("weights comonotone with teacher safety σ_k = S(p_k) (OSM)", "linear pool",
                     "safety functional linear in the distribution, S(p) = 1 − p(U) ∈ [0, 1]",
                     "student fit measured as forward KL(q‖p_θ) (Pinsker)"),
        measured=min_margin, bound=0.0, comparison=f"min_samples[S(q) − mean σ] >= −{tol} and no Pinsker violation",
        passed=passed,
        message=(f"operator {op_name!r}: S(q) ≥ mean teacher safety on all {n} samples (min margin "
                 f"{min_margin:.2e}); student within √(ε/2) everywhere (|ΔS|/√(ε/2) ≤ "
                 f"{pinsker_ratio.max().item():.3f})") if passed else
                (f"operator {op_name!r}: safety preservation FAILS — S(q) < mean σ on {chebyshev_violations}/{n} "
                 f"samples (worst margin {min_margin:.3f}); Pinsker violations: {pinsker_violations}"),
        reference="arXiv 2601.17910, safety preservation under ordinal weighting (bounds: reconstruction)", seed=seed,
        details={"operator": op_name, "chebyshev_violations": chebyshev_violations,
                 "chebyshev_violation_rate": chebyshev_violations / n, "min_margin": min_margin,
                 "mean_margin": margin.mean().item(), "pinsker_violations": pinsker_violations,
                 "pinsker_max_ratio": pinsker_ratio.max().item(), "max_eps": eps.max().item(),
                 "student_vs_mean_teacher_minus_pinsker_min": student_floor_margin},
        figure=fig,
    )
