"""Composition harness: normalised product of token/task/context weights.

Ratio bounds multiply, R(w) ≤ Π_s R_s, and per-scale log perturbations with ‖Δlog u_s‖_∞ ≤ η_s move
the composite by ‖Δw‖₁ ≤ 2·tanh(η/2), η = Σ_s η_s. Both are shown tight on constructed cases.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

from safekd.theory._args import in_range, positive_int, seed_arg
from safekd.theory.plotting import new_figure
from safekd.theory.result import TheoryResult
from safekd.theory.toys import DTYPE, generator, random_simplex
from safekd.targets.weighting.compose import SCALES, compose

logger = logging.getLogger(__name__)


def _ratio(w: Tensor) -> Tensor:
    return w.amax(-1) / w.amin(-1)


def composition(*, seed: int = 0, samples: int = 1000, teachers: int = 5, max_eta: float = 1.5,
                tol: float = 1e-9, plot: bool = True) -> TheoryResult:
    """Check ratio-bound multiplication and ‖Δw‖₁ ≤ 2·tanh(η/2) on random factors, plus the tight cases.

    Passes when no random sample exceeds either bound and both constructed tight cases reach the
    bound (ratio 1 within ``tol``).
    """
    seed_arg(seed)
    positive_int("samples", samples)
    positive_int("teachers", teachers, minimum=2)
    max_eta = in_range("max_eta", max_eta, 0.0, math.inf, closed_low=False, closed_high=False)
    gen = generator(seed)
    n, k = samples, teachers
    factors = {s: random_simplex(n, k, scale=1.0, gen=gen) for s in SCALES}
    w = compose(**factors).weights
    ratio_bound = torch.stack([_ratio(f) for f in factors.values()]).prod(0)
    ratio_tightness = _ratio(w) / ratio_bound

    etas = {s: max_eta / len(SCALES) * torch.rand(n, 1, generator=gen, dtype=DTYPE) for s in SCALES}
    perturbed = {s: torch.softmax(f.log() + etas[s] * (2 * torch.rand(n, k, generator=gen, dtype=DTYPE) - 1), -1)
                 for s, f in factors.items()}
    dw = (compose(**perturbed).weights - w).abs().sum(-1)
    eta = sum(etas.values()).squeeze(-1)
    lip_bound = 2 * torch.tanh(eta / 2)
    lip_tightness = dw / lip_bound

    # Tight ratio case: every factor puts its max on teacher 0 and its min on teacher 1.
    spread = torch.linspace(1.0, -1.0, k, dtype=DTYPE)
    tight_factors = {s: torch.softmax((i + 1) * 0.4 * spread, -1) for i, s in enumerate(SCALES)}
    tight_ratio = (_ratio(compose(**tight_factors).weights)
                   / torch.stack([_ratio(f) for f in tight_factors.values()]).prod()).item()
    # Tight Lipschitz case (K = 2): composite (1/(1+e^η), e^η/(1+e^η)), each scale moves by (+η_s, −η_s).
    eta_s = torch.full((len(SCALES),), max_eta / len(SCALES), dtype=DTYPE)
    total = eta_s.sum()
    base = {s: torch.full((2,), 0.5, dtype=DTYPE) for s in SCALES}
    base["token"] = torch.stack([torch.sigmoid(-total), torch.sigmoid(total)])
    moved = {s: torch.softmax(f.log() + eta_s[i] * torch.tensor([1.0, -1.0], dtype=DTYPE), -1)
             for i, (s, f) in enumerate(base.items())}
    tight_dw = (compose(**moved).weights - compose(**base).weights).abs().sum().item()
    tight_lip = tight_dw / (2 * math.tanh(total.item() / 2))

    ratio_violations = int((ratio_tightness > 1 + tol).sum())
    lip_violations = int((lip_tightness > 1 + tol).sum())
    worst = max(ratio_tightness.max().item(), lip_tightness.max().item())
    tight_ok = abs(tight_ratio - 1) <= 1e-9 and abs(tight_lip - 1) <= 1e-9
    passed = ratio_violations == 0 and lip_violations == 0 and tight_ok
    fig = None
    if plot:
        fig, (ax0, ax1) = new_figure(2)
        ax0.loglog(ratio_bound.numpy(), _ratio(w).numpy(), ".", ms=2, alpha=0.5, label="random factors")
        ax0.plot([1, ratio_bound.max().item()], [1, ratio_bound.max().item()], "k--", lw=1, label="R = Π R_s")
        ax0.set(xlabel="Π_s R_s", ylabel="composite ratio max w / min w", title="ratio bounds multiply")
        ax0.legend()
        grid = np.linspace(0, max_eta, 100)
        ax1.plot(eta.numpy(), dw.numpy(), ".", ms=2, alpha=0.5, label="random perturbations")
        ax1.plot(grid, 2 * np.tanh(grid / 2), "k--", lw=1, label="2·tanh(η/2)")
        ax1.plot([total.item()], [tight_dw], "r*", ms=10, label="tight case")
        ax1.set(xlabel="η = Σ_s η_s", ylabel="‖Δw‖₁", title="log-Lipschitz composition")
        ax1.legend()
    return TheoryResult(
        name="composition",
        claim="Under product-structure normalisation, per-scale ratio bounds multiply and per-scale log-Lipschitz "
              "constants add: ‖Δw‖₁ ≤ 2·tanh(Σ_s η_s / 2).",
        source_tag="reconstruction",
        assumptions=("composite w ∝ w^tok · w^task · w^ctx, normalised over teachers only",
                     "factors strictly positive (finite ratio bounds)",
                     "per-scale unnormalised log-weights move by at most η_s in ℓ∞"),
        measured=worst, bound=1.0 + tol, comparison="max over samples of measured/bound for both inequalities "
                                                    "<= bound, and both tight cases reach ratio 1",
        passed=passed,
        message=f"ratio bound tightness ≤ {ratio_tightness.max().item():.3f} (tight case {tight_ratio:.6f}), "
                f"‖Δw‖₁/(2tanh(η/2)) ≤ {lip_tightness.max().item():.3f} (tight case {tight_lip:.6f}); "
                f"violations: {ratio_violations} ratio, {lip_violations} Lipschitz",
        reference="arXiv 2601.17910, product-structure composition (bounds: reconstruction)", seed=seed,
        details={"ratio_violations": ratio_violations, "lipschitz_violations": lip_violations,
                 "ratio_max_tightness": ratio_tightness.max().item(), "lipschitz_max_tightness":
                 lip_tightness.max().item(), "tight_ratio_case": tight_ratio, "tight_lipschitz_case": tight_lip,
                 "tight_eta": total.item()},
        figure=fig,
    )
