"""The dual side of :class:`~safekd.distiller.SafeDistiller`, split as cooper splits it: the update order, the
multiplier rule built from the spec, the alarm (a statistical trend test on each constraint's violation), the
resilient relaxations that ``on_alarm: relax`` trades off against the multipliers, and :class:`DualState`, which
holds them for one run and takes the dual step.

Update orders (θ primal, λ dual, g the measured residual, η the dual step):

* ``"simultaneous"``: θ_{t+1} = θ_t − ∇_θ ℒ(θ_t, λ_t),  λ_{t+1} = [λ_t + η g(θ_t)]₊  (cooper's SimultaneousOptimizer);
* ``"dual_primal"``:  λ_{t+1} = [λ_t + η g(θ_t)]₊,  θ_{t+1} = θ_t − ∇_θ ℒ(θ_t, λ_{t+1})  (AlternatingDualPrimal);
* ``"primal_dual"``:  θ_{t+1} = θ_t − ∇_θ ℒ(θ_t, λ_t),  λ_{t+1} = [λ_t + η g(θ_{t+1})]₊, g re-measured on the same
  batch after the primal step (AlternatingPrimalDual).

Resilient relaxation (Hounie et al., NeurIPS 2023): constraint j's threshold becomes ε_j + u_j with u_j ≥ 0 of cost
h(u) = (α/2)·u², updated with the multiplier as u ← [u − η_u (α u − λ)]₊; at equilibrium α u = λ, so an unattainable
threshold is relaxed by what it costs instead of letting λ grow without bound.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from safekd.training.checkpoint import check_optimizer_state
from safekd.common.distributed import assert_states_identical
from safekd.common.measurement import ConstraintMeter
from solvers import multipliers as M

if TYPE_CHECKING:  # pragma: no cover
    from safekd.spec.constraints import StudentConstraint
    from safekd.spec.document import DualSpec, Spec

__all__ = ["ORDERS", "resolve_order", "make_rule", "MultiplierAlarm", "MultiplierAlarmError",
           "trend_z", "sen_slope", "AlarmMonitor", "Relaxations", "DualState"]

logger = logging.getLogger(__name__)

ORDERS = ("simultaneous", "dual_primal", "primal_dual")
_DEPRECATED_ORDERS = {"dual_first": "dual_primal", "primal_first": "primal_dual"}


class MultiplierAlarm(UserWarning):
    """A multiplier keeps growing while its constraint's violation stays flat above the minimum size."""


class MultiplierAlarmError(RuntimeError):
    """Raised after the step that raised an alarm when ``checks.on_alarm`` is ``"stop"`` (the step is complete and
    logged, so the run can be checkpointed and inspected)."""


def resolve_order(order: str) -> str:
    """``order`` checked against :data:`ORDERS`; the old names map with a :class:`DeprecationWarning`
    (``dual_first`` → ``dual_primal``; ``primal_first`` → ``primal_dual``, the alternating order it was documented as).

    Raises:
        ValueError: an unknown order.
    """
    if order in _DEPRECATED_ORDERS:
        new = _DEPRECATED_ORDERS[order]
        warnings.warn(f"order={order!r} is deprecated; use order={new!r}" + (
            " (it now re-measures the constraints after the primal step, as documented; order='simultaneous' is "
            "what it used to run)" if order == "primal_first" else ""), DeprecationWarning, stacklevel=3)
        return new
    if order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
    return order


def make_rule(dual: "DualSpec", params: Sequence[Tensor]) -> torch.optim.Optimizer:
    """The multiplier rule of a :class:`~safekd.spec.DualSpec` over ``params`` (one 0-d tensor per constraint)."""
    if dual.rule == "gradient_ascent":
        return M.GradientAscent(params, lr=dual.lr)
    if dual.rule == "nupi":
        return M.NuPI(params, lr=dual.lr, kp=dual.kp, ki=dual.ki, ema_nu=dual.ema_nu)
    return M.AugmentedLagrangian(params, penalty=dual.penalty, growth=dual.growth, max_penalty=dual.max_penalty,
                                 patience=dual.patience)


def trend_z(x: Sequence[float]) -> float:
    """Mann–Kendall statistic of ``x`` as a z-score: S = Σ_{i<j} sign(x_j − x_i), z = (S − sign S)/√(n(n−1)(2n+5)/18)
    (no tie correction); z ≪ 0 is a significant decrease, z ≫ 0 a significant increase."""
    t = torch.tensor(list(x), dtype=torch.float64)
    n = t.numel()
    s = float(torch.sign(t.unsqueeze(0) - t.unsqueeze(1)).triu(1).sum())
    var = n * (n - 1) * (2 * n + 5) / 18
    return (s - math.copysign(1.0, s) * (s != 0)) / math.sqrt(var) if var > 0 else 0.0


def sen_slope(x: Sequence[float]) -> float:
    """Theil–Sen slope of ``x`` against its index: the median of (x_j − x_i)/(j − i) over i < j."""
    t = torch.tensor(list(x), dtype=torch.float64)
    i, j = torch.triu_indices(t.numel(), t.numel(), 1)
    return float(((t[j] - t[i]) / (j - i)).median()) if i.numel() else 0.0


class AlarmMonitor:
    """Per constraint, the last ``window`` dual steps' (λ, violation). A window is *stuck* when λ grew, every
    violation exceeded ``min_violation`` and the violation is flat: no trend, up or down, that is both significant at
    ``level`` (two-sided Mann–Kendall) and material (the Theil–Sen slope moves it by at least ``min_change`` of its
    mean over the window; round-off drifts are significant but not material). The alarm stands once ``window // 2``
    consecutive windows were stuck. A feasible problem converging shows a decrease (or a violation under
    ``min_violation``), one in its transient (the KD objective pulling the violation up while λ builds) an increase,
    and the turn between the two is flat only briefly; an unattainable threshold leaves the violation where it is
    while λ grows."""

    def __init__(self, names: Sequence[str], window: int, min_violation: float, level: float,
                 min_change: float = 0.01) -> None:
        self.window, self.min_violation, self.min_change = window, min_violation, min_change
        self.z_crit = NormalDist().inv_cdf(1 - level / 2) if 0 < level < 1 else math.inf
        self.history: dict[str, deque[tuple[float, float]]] = {n: deque(maxlen=max(window, 1)) for n in names}
        self.streak = dict.fromkeys(names, 0)
        self.active: set[str] = set()

    def update(self, name: str, multiplier: float, violation: float) -> bool:
        """Record one dual step of ``name``; returns True when its alarm is newly raised."""
        h = self.history[name]
        h.append((multiplier, max(violation, 0.0)))
        v = [x for _, x in h]
        stuck = (self.window > 0 and len(h) == self.window and h[-1][0] > h[0][0] and min(v) > self.min_violation
                 and not (abs(trend_z(v)) >= self.z_crit
                          and abs(sen_slope(v)) * (len(v) - 1) >= self.min_change * sum(v) / len(v)))
        self.streak[name] = self.streak[name] + 1 if stuck else 0
        raised = self.streak[name] >= max(self.window // 2, 1)
        new = raised and name not in self.active
        (self.active.add if raised else self.active.discard)(name)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"history": {n: [list(x) for x in h] for n, h in self.history.items()}, "streak": dict(self.streak),
                "active": sorted(self.active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state["history"]) - set(self.history))
        if unknown:
            raise ValueError(f"alarm state names constraints {unknown} this distiller lacks")
        for n, h in state["history"].items():
            self.history[n].clear()
            self.history[n].extend(tuple(x) for x in h)
        self.streak.update(state["streak"])
        self.active = set(state["active"])


class Relaxations:
    """Resilient relaxations u_j ≥ 0 (float64, one per constraint), engaged per constraint (at its first alarm);
    :meth:`step` applies u ← [u − lr·(cost·u − λ)]₊ to the engaged ones."""

    def __init__(self, names: Sequence[str], cost: float, lr: float) -> None:
        self.cost, self.lr = cost, lr
        self.u: dict[str, Tensor] = {n: torch.zeros((), dtype=torch.float64) for n in names}
        self.engaged: set[str] = set()

    def value(self, name: str) -> Tensor:
        return self.u[name]

    def step(self, multipliers: dict[str, Tensor]) -> None:
        for n in self.engaged:
            u = self.u[n]
            u.sub_(self.lr * (self.cost * u - multipliers[n].detach().to(u))).clamp_(min=0)

    def state_dict(self) -> dict[str, Any]:
        return {"u": {n: t.clone() for n, t in self.u.items()}, "engaged": sorted(self.engaged)}

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError unless ``state`` fits (names, finite u ≥ 0); nothing changes."""
        if sorted(state["u"]) != sorted(self.u):
            raise ValueError(f"checkpoint relaxations {sorted(state['u'])} != this spec's {sorted(self.u)}")
        for n, t in state["u"].items():
            if not isinstance(t, Tensor) or t.shape != () or not bool(torch.isfinite(t)) or float(t) < 0:
                raise ValueError(f"checkpoint relaxation {n!r} must be a finite scalar >= 0, got {t!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        for n, t in state["u"].items():
            self.u[n].copy_(t)
        self.engaged = set(state["engaged"])


class DualState:
    """The dual side of one run: multipliers λ_j (float64 scalars, by constraint name), their rule, the window
    meter, the alarms, the relaxations u_j and the step events; :meth:`step` is the dual step
    λ_j ← rule(λ_j, g_j − u_j) from the window's measured residuals g_j."""

    def __init__(self, spec: Spec) -> None:
        self.spec, self.constraints = spec, spec.student_constraints
        names = [c.name for c in self.constraints]
        self.multipliers: dict[str, Tensor] = {n: torch.full((), float(spec.dual.init), dtype=torch.float64)
                                                for n in names}
        self.rule = make_rule(spec.dual, list(self.multipliers.values())) if names else None
        self.meter = ConstraintMeter(names, sync=False)
        ch = spec.checks
        self.alarms = AlarmMonitor(names, ch.alarm_window, ch.alarm_min_violation, ch.alarm_level)
        self.relaxations = Relaxations(names, ch.relax_cost, ch.relax_lr if ch.relax_lr is not None else spec.dual.lr)
        self.window: dict[str, float] = {}  # the last dual window: g_j − u_j per stepped constraint
        self.events = {"relaxed_tokens": 0, "corrected_tokens": 0, "alarms": 0}

    def step(self, states: list[dict[str, Any]], shared: Mapping[str, Tensor]) -> bool:
        """Add the step's sums and counts to the window; at its end write g_j − u_j into λ_j.grad and step the rule
        (a constraint with no measured token in the window is not stepped: no measurement, no dual step), then the
        engaged relaxations; ``shared`` (with λ) must be identical on every rank. Keeps the window's residuals in
        :attr:`window` for the alarms; returns whether the rule stepped."""
        if self.rule is None:
            return False
        self.meter.update(torch.stack([s["value"] * s["count"] for s in states]),
                          torch.stack([s["count"] for s in states]))
        if self.meter.updates < self.spec.dual.every:
            return False
        rates, counts = self.meter.compute()
        self.meter.reset()
        self.window = {}
        lams_before = {n: self.multipliers[n].detach().clone() for n in self.relaxations.engaged}
        for s, rate, seen in zip(states, rates, (counts > 0).tolist()):
            name = s["constraint"].name
            lam = self.multipliers[name]
            if not seen:
                lam.grad = None
                continue
            g = s["constraint"].residual(rate) - self.relaxations.value(name).to(rate)
            self.window[name] = float(g)
            lam.grad = torch.as_tensor(g, dtype=lam.dtype).detach().clone()
        self.rule.step()
        self.relaxations.step(lams_before)
        # DDP: every rank must hold the same λ and running statistics
        assert_states_identical({**{f"multipliers[{n}]": t for n, t in self.multipliers.items()}, **shared})
        self.rule.zero_grad(set_to_none=True)
        return True

    def raise_alarms(self) -> list[str]:
        """Feed the window's (λ, violation) to the alarm monitor; warn once per newly raised alarm and, with
        ``on_alarm: relax``, engage that constraint's relaxation. Returns the newly alarmed constraint names."""
        raised = []
        for name, g in self.window.items():
            if self.alarms.update(name, float(self.multipliers[name]), g):
                raised.append(name)
                self.events["alarms"] += 1
                c = next(c for c in self.constraints if c.name == name)
                msg = self._alarm_message(c, list(self.alarms.history[name]))
                if self.spec.checks.on_alarm == "relax":
                    self.relaxations.engaged.add(name)
                    msg += " Relaxing it (checks.on_alarm: relax): see 'relaxation' in the step record."
                logger.warning(msg)
                # raise_alarms ← SafeDistiller._finish ← step/finish_step ← the caller
                warnings.warn(msg, MultiplierAlarm, stacklevel=4)
        return raised

    def standing_alarms(self) -> list[dict[str, str]]:
        """``[{constraint, message}]`` for every alarm still standing."""
        return [{"constraint": c.name, "message": self._alarm_message(c, list(self.alarms.history[c.name]))}
                for c in self.constraints if c.name in self.alarms.active]

    def _alarm_message(self, c: StudentConstraint, hist: list[tuple[float, float]]) -> str:
        return (f"multiplier of {c.name!r} grew over {len(hist)} dual steps ({hist[0][0]:.4g} → {hist[-1][0]:.4g}) "
                f"while its violation stayed above {self.alarms.min_violation:g} with no significant decrease "
                f"({hist[0][1]:.4g} → {hist[-1][1]:.4g}). Likely cause: the threshold {c.sense} {c.threshold:g} is "
                "unattainable for this student (or infeasible together with the KD objective and the teacher-weight "
                "constraints); consider relaxing the threshold (or checks.on_alarm: relax), tightening unsafe_mass / "
                "safety_order on the teachers, or checking that the proxy moves the measured value.")

    def report(self, states: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """:attr:`StepRecord.constraints <safekd.distiller.StepRecord.constraints>` from the step's states."""
        out = {}
        for s in states:
            c = s["constraint"]
            out[c.name] = {"sense": c.sense, "threshold": c.threshold, "value": float(s["value"]),
                           "residual": float(s["residual"]), "multiplier": float(self.multipliers[c.name]),
                           "count": float(s["count"]), "satisfied": bool(float(s["residual"]) <= c.tolerance),
                           "relaxation": float(self.relaxations.value(c.name))}
        return out

    def snapshot(self) -> dict[str, Any]:
        """A copy of everything a dual step changes (J scalars, their rule's state, the window), for :meth:`restore`."""
        return copy.deepcopy({**self.state_dict(), "window": self.window})

    def restore(self, state: dict[str, Any]) -> None:
        """Undo dual steps taken since :meth:`snapshot` returned ``state``."""
        self.load_state_dict(state)
        self.window = state["window"]

    def state_dict(self) -> dict[str, Any]:
        """The dual part of a distiller state: multipliers (by constraint name), rule, meter, alarms, relaxations,
        events."""
        return {"multipliers": {n: t.detach().clone() for n, t in self.multipliers.items()},
                "dual_optimizer": None if self.rule is None else self.rule.state_dict(),
                "meter": self.meter.state_dict(), "alarms": self.alarms.state_dict(),
                "relaxations": self.relaxations.state_dict(), "events": dict(self.events)}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError unless the dual part of a distiller state (multipliers finite ≥ 0 by constraint name,
        rule, meter, alarms, relaxations) fits; nothing is written."""
        names = sorted(self.multipliers)
        if sorted(state["multipliers"]) != names:
            raise ValueError(f"checkpoint constraints {sorted(state['multipliers'])} != this spec's {names}")
        for n, t in state["multipliers"].items():
            if not isinstance(t, Tensor) or t.shape != () or not bool(torch.isfinite(t)) or float(t) < 0:
                raise ValueError(f"checkpoint multiplier {n!r} = {t!r} is not a finite scalar >= 0")
        if self.rule is not None:
            check_optimizer_state("dual_optimizer", self.rule, state["dual_optimizer"])
        if list(state["meter"]["names"]) != list(self.meter.names):
            raise ValueError(f"checkpoint meter constraints {state['meter']['names']} != {list(self.meter.names)}")
        if sorted(state["alarms"]["history"]) != names:
            raise ValueError(f"checkpoint alarm constraints {sorted(state['alarms']['history'])} != {names}")
        self.relaxations.check_state(state["relaxations"])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the dual part of a distiller state (checked by :meth:`check_state` first)."""
        with torch.no_grad():
            for n, t in state["multipliers"].items():
                self.multipliers[n].copy_(t)
        if self.rule is not None:
            self.rule.load_state_dict(state["dual_optimizer"])
        self.meter.load_state_dict(state["meter"])
        self.alarms.load_state_dict(state["alarms"])
        self.relaxations.load_state_dict(state["relaxations"])
        self.events = dict(state["events"])
