"""The Lagrangian of :class:`~safekd.distiller.SafeDistiller`: the student constraints measured, reduced over ranks
and turned into the penalty term.

ℒ = L_KD + Σ_j λ_j ĝ_j (+ Σ_j (ρ_j/2)·max(0, ĝ_j)² for the augmented Lagrangian), with ĝ_j the signed residual of
constraint j's differentiable proxy (g ≤ 0 convention) and λ_j, ρ_j read from the :class:`~safekd.dual.DualState`.
The KD sum and every constraint's value and proxy sums and counts travel in ONE all-reduce (:meth:`reduce_terms`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safekd.spec import constraints as C
from safekd.common.distributed import get_world_size, token_mean_scale
from safekd.training.dual import DualState
from safekd.targets.head import StudentHidden
from safekd.common.measurement import reduce_sums_counts
from safekd.targets.sparse import hidden_pass
from safekd.spec.document import Spec
from safekd.targets.pipeline import Targets, require_finite

__all__ = ["Lagrangian", "default_divergence"]


class Lagrangian:
    """The student constraints of ``spec`` and their penalty at the multipliers of ``dual``."""

    def __init__(self, spec: Spec, dual: DualState) -> None:
        self.spec, self.dual = spec, dual
        self.student_constraints = spec.student_constraints
        self.teacher_index = spec.teacher_index

    def kd_divergence(self, t: Targets, student_logits: Tensor | StudentHidden, divergence: Callable[..., Any],
                      builtin: bool) -> Any:
        """The KD divergence D(q_t ‖ p_θ) of the step (with ``.sum``/``.count``): on the union support + tail
        buckets for sparse teachers (:mod:`safekd.sparse`; a :class:`~safekd.head.StudentHidden` student is read
        there in one chunked pass that also measures the student constraints), else dense; the ``builtin`` forward
        KL at temperature 1 shares one student normaliser log p_θ with the constraints (unsafe_rate, kl_to, retain)."""
        if t.sparse is not None:
            return t.sparse.divergence(divergence, student_logits, t.mask, self.spec.temperature, t.context,
                                       self.student_constraints)
        shared = {}
        if builtin and self.spec.temperature == 1.0:
            shared["student_logp"] = t.context.student_logp = F.log_softmax(student_logits, dim=-1)
        return divergence(t.target_logp, student_logits, mask=t.mask, temperature=self.spec.temperature, **shared)

    def reduce_terms(self, ctx: C.MeasureContext, kd_sum: Tensor, kd_count: Tensor | int | float
                     ) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
        """Measure every student constraint and SUM-reduce over ranks, in one all-reduce, the stacked sums
        [S_KD, value_j, proxy_j] and counts [N, n_j, n_j]. Returns this rank's differentiable KD share
        S_r·W/N (see :func:`safekd.distributed.global_token_mean`), the global KD mean S/N (detached) and
        per-constraint states: global value, count and residual, this rank's differentiable proxy residual
        ĝ_j = g(proxy_r·W/n_j) and the global (detached) proxy residual g(proxy/n_j)."""
        dtype, device = kd_sum.dtype, kd_sum.device
        ms = [c.measure(ctx) for c in self.student_constraints]
        proxy_sums = [m.proxy_sum.to(dtype) for m in ms]
        counts = [torch.as_tensor(m.count, dtype=dtype, device=device) for m in ms]
        g_sums, g_counts = reduce_sums_counts(
            torch.stack([kd_sum, *(m.value_sum.to(dtype) for m in ms), *proxy_sums]),
            torch.stack([torch.as_tensor(kd_count, dtype=dtype, device=device), *counts, *counts]))
        world, J = get_world_size(), len(ms)
        kd_loss, kd_mean = kd_sum * token_mean_scale(g_counts[0], world), g_sums[0] * token_mean_scale(g_counts[0], 1)
        values = g_sums[1:J + 1] / g_counts[1:J + 1].clamp_min(1)
        states = []
        for j, c in enumerate(self.student_constraints):
            n_j = g_counts[1 + j].clamp_min(1)
            states.append({"constraint": c, "value": values[j], "count": g_counts[1 + j],
                           "residual": c.residual(values[j]),
                           "proxy_residual": c.residual(proxy_sums[j] * (world / n_j)),
                           "global_proxy_residual": c.residual(g_sums[1 + J + j] * (1 / n_j))})
        return kd_loss, kd_mean, states

    def penalty(self, residuals: list[Tensor], like: Tensor) -> Tensor:
        """Σ_j λ_j ĝ_j (+ Σ_j (ρ_j/2)·max(0, ĝ_j)² for the augmented Lagrangian) at the current multipliers."""
        total = like.new_zeros(())
        alm = self.spec.dual.rule == "augmented_lagrangian"
        for j, (c, r) in enumerate(zip(self.student_constraints, residuals)):
            # a copy: the dual rules update λ in place, possibly before the framework back-propagates this term
            lam = self.dual.multipliers[c.name].detach().to(like.dtype, copy=True)
            total = total + lam * r
            if alm:
                rho = float(self.dual.rule.penalty_coefficient(j))  # type: ignore[union-attr]
                total = total + 0.5 * rho * r.clamp_min(0).square()
        return total

    def remeasure(self, student: nn.Module, t: Targets) -> list[dict[str, Any]]:
        """The student constraints at θ_{t+1} on the step's batch (``order="primal_dual"``): one no-grad student
        forward; the teacher side (targets, teacher log-probabilities) is the step's."""
        batch = t.context.batch
        with torch.no_grad():
            logits = student(batch["inputs"])
            if isinstance(logits, StudentHidden):
                require_finite("student hidden states (re-measured after the primal step)", logits.hidden)
                if t.sparse is not None:
                    ctx = dataclasses.replace(t.context, student_stats=None)
                    hidden_pass(t.sparse.buckets, logits, 1.0, ctx, self.student_constraints)
                    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
                    return self.reduce_terms(ctx, zero, 0)[2]
                logits = logits.logits()
            require_finite("student logits (re-measured after the primal step)", logits)
            ctx = C.MeasureContext(student_logits=logits, batch=batch, teacher_logprobs=t.teacher_logp,
                                   teacher_index=self.teacher_index, unsafe=self.spec.unsafe, _mask=t.mask)
            ctx.target_logp = t.target_logp
            zero = logits.new_zeros((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
            return self.reduce_terms(ctx, zero, 0)[2]


def default_divergence() -> Callable[..., Any]:
    """Forward KL without re-validation (student logits and target are checked by the distiller)."""
    from safekd.targets.divergences import forward_kl

    return functools.partial(forward_kl, validate_args=False)
