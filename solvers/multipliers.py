"""Dual (multiplier) update rules for Lagrangian methods, as ``torch.optim.Optimizer`` subclasses.

Protocol: the caller writes the **measured residual** ``g`` (true value, sign convention ``g ≤ 0``) into
``λ.grad`` and calls ``step()``; the rule *ascends* and then projects onto ``λ ≥ 0`` in one place
(:func:`_project_nonneg`). Every rule has ``state_dict``/``load_state_dict`` (torch's protocol).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["GradientAscent", "NuPI", "AugmentedLagrangian"]

logger = logging.getLogger(__name__)


def _project_nonneg(p: Tensor) -> None:
    """The single place where λ ≥ 0 is enforced."""
    p.clamp_(min=0)


def _check(name: str, value: float, low: float = 0.0, strict: bool = False) -> None:
    if not isinstance(value, (int, float)) or value != value or (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")


class _DualRule(Optimizer):
    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise ValueError("sparse residuals are not supported")
                    yield group, p

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p in self._params():
            self._update(group, p, p.grad, self.state[p])
            _project_nonneg(p)
        return loss

    def _update(self, group: dict, p: Tensor, g: Tensor, state: dict) -> None:
        raise NotImplementedError


class GradientAscent(_DualRule):
    """Projected gradient ascent: ``λ ← [λ + lr·g]₊``."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float) -> None:
        _check("lr", lr, strict=True)
        super().__init__(params, {"lr": lr})

    def _update(self, group, p, g, state):
        p.add_(g, alpha=group["lr"])


class NuPI(_DualRule):
    """νPI (Sohrabi et al., 2024): PI control of λ on the EMA-smoothed residual.

    ``ξ_t = ν ξ_{t−1} + (1−ν) g_t`` (``ξ_{−1} = 0``), ``λ ← [λ + lr·(κ_i g_t + κ_p (ξ_t − ξ_{t−1}))]₊``;
    ``κ_p = 0`` is gradient ascent with step ``lr·κ_i``; ``ν = 0`` is plain PI control.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float, kp: float, ki: float = 1.0,
                 ema_nu: float = 0.0) -> None:
        _check("lr", lr, strict=True)
        _check("kp", kp)
        _check("ki", ki)
        if not 0.0 <= ema_nu < 1.0:
            raise ValueError(f"ema_nu must be in [0, 1), got {ema_nu!r}")
        super().__init__(params, {"lr": lr, "kp": kp, "ki": ki, "ema_nu": ema_nu})

    def _update(self, group, p, g, state):
        xi_prev = state.get("xi")
        if xi_prev is None:
            xi_prev = torch.zeros_like(p)
        xi = xi_prev * group["ema_nu"] + g * (1 - group["ema_nu"])
        p.add_(group["ki"] * g + group["kp"] * (xi - xi_prev), alpha=group["lr"])
        state["xi"] = xi
        state["step"] = state.get("step", 0) + 1


class AugmentedLagrangian(_DualRule):
    """Augmented-Lagrangian multiplier rule: ``λ ← [λ + ρ g]₊``, the primal side adding ``ρ/2·max(g, 0)²`` (read
    ``ρ`` with :meth:`penalty_coefficient`). The penalty follows the standard schedule with a cap, paced for one
    primal step per dual step: every ``patience`` dual steps, ``ρ ← min(growth·ρ, max_penalty)`` where the
    constraint was violated (g > 0) at every one of those steps and the violation has not shrunk below ``shrink ×``
    its value at the previous check. A residual that changes sign is the primal overshooting, not stalling: ρ stays
    (growing on every step sent ρ, and λ with it, far past what a single primal step can follow).

    Raises:
        ValueError: ``penalty`` not > 0, ``growth`` < 1, ``max_penalty`` < ``penalty``, ``shrink`` outside (0, 1] or
            ``patience`` < 1.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], penalty: float = 1.0, growth: float = 2.0,
                 max_penalty: float = 100.0, shrink: float = 0.25, patience: int = 10) -> None:
        _check("penalty", penalty, strict=True)
        _check("growth", growth, low=1.0)
        _check("max_penalty", max_penalty, low=penalty)
        if not 0.0 < shrink <= 1.0:
            raise ValueError(f"shrink must be in (0, 1], got {shrink!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        super().__init__(params, {"penalty": penalty, "growth": growth, "max_penalty": max_penalty,
                                  "shrink": shrink, "patience": patience})

    def _rho(self, group: dict, p: Tensor) -> Tensor:
        state = self.state[p]
        if "rho" not in state:
            state["rho"] = torch.full_like(p, group["penalty"])
        return state["rho"]

    def _update(self, group, p, g, state):
        rho = self._rho(group, p)
        p.add_(rho * g)
        violated = state.get("violated", torch.ones_like(g, dtype=torch.bool)) & (g > 0)
        state["step"] = step = state.get("step", 0) + 1
        if step % group["patience"]:
            state["violated"] = violated
            return
        viol = g.clamp_min(0)
        prev = state.get("violation")
        if prev is not None:
            stalled = violated & (viol > group["shrink"] * prev)
            rho.copy_(torch.where(stalled, (rho * group["growth"]).clamp_max(group["max_penalty"]), rho))
        state["violation"] = viol.clone()
        state["violated"] = torch.ones_like(violated)

    def penalty_coefficient(self, i: int = 0) -> Tensor:
        """Penalty ``ρ`` (same shape as the multiplier) of the ``i``-th parameter across all groups."""
        flat = [(g, p) for g in self.param_groups for p in g["params"]]
        if not 0 <= i < len(flat):
            raise IndexError(f"parameter index {i} out of range for {len(flat)} multiplier tensors")
        return self._rho(*flat[i])
