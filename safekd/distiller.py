"""`SafeDistiller`: a torch.optim-style wrapper running one safety-constrained distillation step per batch.

Per step (``step(batch) -> StepRecord``):

1. teacher logits (cached in the batch, or teacher forwards under ``no_grad``) → log p_k = log_softmax(z_k / T_k);
2. student forward; NaN/inf in teacher or student logits raise :class:`NonFiniteError` before anything changes;
3. per-scale weights (weighting operators, stop-gradient) composed by normalised product;
4. projection of each unmasked token's weights onto its feasible set W_t (static caps/floors/groups/order plus
   per-token ``unsafe_mass`` / ``exclude`` rows); tokens whose W_t is empty are solved on the least-relaxed set
   and, if their pooled unsafe mass exceeds ε, the target itself is corrected (unsafe mass moved onto safe tokens
   in proportion);
5. pooled target q_t = G(p_1..p_K; w_t) and the divergence L_KD = Σ_t D(q_t ‖ p_θ) / #tokens;
6. Lagrangian ℒ = L_KD + Σ_j λ_j ĝ_j (+ (ρ_j/2)·max(0, ĝ_j)² for the augmented Lagrangian), with ĝ_j the
   signed residual of constraint j's differentiable proxy (g ≤ 0 convention);
7. backward, primal step and the dual step λ_j ← rule(λ_j, g_j − u_j) with the TRUE measured residual g_j written
   to λ_j.grad (every ``spec.dual.every`` steps, from sums and counts accumulated over the window; u_j the resilient
   relaxation, 0 unless ``checks.on_alarm: relax`` engaged it), in the ``order`` of :mod:`safekd.dual`.

Public surface: ``targets(batch, student_logits=None) -> Targets`` (steps 1, 3–5 without training: the audit's
view), ``loss(batch) -> (lagrangian, PendingStep)`` (steps 1–6) and ``finish_step(pending) -> StepRecord``
(step 7's dual half, record, log): ``step`` = loss → backward → optimizer step → finish_step, and training
frameworks that own backward and the optimizer call ``loss`` and ``finish_step`` themselves.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import solvers
from safekd import constraints as C
from safekd.batches import IGNORE_INDEX
from safekd.checkpoint import DISTILLER_STATE_KEYS
from safekd.distributed import (assert_states_identical, full_state_dicts, get_world_size, is_rank_zero,
                                load_full_state_dicts, token_mean_scale, unwrap)
from safekd.dual import AlarmMonitor, MultiplierAlarm, MultiplierAlarmError, Relaxations, make_rule, resolve_order
from safekd.measurement import ConstraintMeter, reduce_sums_counts
from safekd.signals import Signals, all_finite
from safekd.sparse import SparseTeachers, distiller_targets, token_rows
from safekd.spec import Spec
from safekd.teachers import teacher_outputs
from safekd.weighting.compose import SCALES, compose

__all__ = ["SafeDistiller", "StepRecord", "Targets", "PendingStep", "NonFiniteError", "ProjectionCheckError",
           "MultiplierAlarm", "MultiplierAlarmError"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]
TeacherFn = Callable[[Any], Tensor]


class NonFiniteError(FloatingPointError):
    """NaN/inf in teacher logits, student logits, the loss or the gradients; raised before any state changes."""


class ProjectionCheckError(solvers.SolverError):
    """The batched projection disagrees with the cvxpy reference beyond tolerance."""


@dataclass
class StepRecord:
    """What one step did. ``constraints[name]`` = {sense, value, threshold, residual, multiplier, count,
    satisfied (residual ≤ tolerance), relaxation (u ≥ 0: the threshold in force is threshold + u for ``<=``,
    threshold − u for ``>=``; 0 unless ``on_alarm: relax`` engaged it)};
    ``weights[scale][teacher]`` = mean weight over unmasked tokens for each scale, ``composed`` and ``projected``;
    ``projection`` = {tokens (unmasked), projected_tokens (outside their set, sent to the solver), active (per
    constraint name), relaxed_tokens, corrected_tokens, max_kkt_residual};
    ``alarms`` = [{constraint, message}]; ``reference_check`` = {rows, max_abs_diff} or, when the reference solver
    failed, {rows: 0, error} (re-checked on the next step)."""

    step: int
    loss: float
    kd_loss: float
    penalty: float
    constraints: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    projection: dict[str, Any] = field(default_factory=dict)
    alarms: list[dict[str, str]] = field(default_factory=list)
    dual_updated: bool = False
    reference_check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (floats, ints, strings, lists, dicts)."""
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Targets:
    """What :meth:`SafeDistiller.targets` computed for one batch (tokens ``[...]``, K teachers, V classes).

    ``per_scale[scale]``, ``composed`` (normalised product w̄) and ``weights`` (projected, w = Π_W(w̄)) are
    ``[..., K]``; ``feasible_set`` holds the unmasked tokens' sets W_t ``[N, K]`` in the projection dtype (None
    without teacher-weight constraints or unmasked tokens; unbatched when every token shares the static set);
    ``relaxed``/``corrected`` are ``[...]`` bool (empty W_t solved on the least-relaxed set / target corrected);
    ``target_logp`` is the pooled, corrected target log q ``[..., V]``; ``projection`` the stats of
    :attr:`StepRecord.projection`; ``context`` the constraint :class:`~safekd.constraints.MeasureContext`.
    With sparse teachers (``teacher_topk_*`` batch keys) ``sparse`` is the bucket view
    (:class:`~safekd.sparse.SparseTargets`); ``targets()`` then gives the dense uniform-tail views, ``loss()``
    the bucket ones (see :mod:`safekd.sparse`).
    """

    teacher_logits: Tensor
    teacher_logp: Tensor
    mask: Tensor
    per_scale: dict[str, Tensor]
    composed: Tensor
    weights: Tensor
    feasible_set: solvers.FeasibleSet | None
    relaxed: Tensor
    corrected: Tensor
    target_logp: Tensor
    projection: dict[str, Any]
    context: C.MeasureContext
    sparse: Any = None
    convex_residuals: dict[str, Tensor] = field(default_factory=dict)  #: per convex constraint: signed residual [...]


@dataclass(eq=False)
class PendingStep:
    """A step between :meth:`SafeDistiller.loss` and :meth:`SafeDistiller.finish_step`: its targets, the global
    KD mean and penalty (detached, for the record), the constraint states, whether the dual step ran and the
    reference check run before the step (if due)."""

    targets: Targets
    kd_loss: Tensor
    penalty: Tensor
    states: list[dict[str, Any]]
    dual_updated: bool = False
    finished: bool = False
    reference_check: dict[str, Any] | None = None


def _require_finite(what: str, t: Tensor, detail: Callable[[Tensor], str] | None = None) -> None:
    if not all_finite(t):
        extra = detail(t) if detail is not None else ""
        raise NonFiniteError(f"{what} contain NaN or inf{extra}; the step was stopped before any parameter changed")


def _check_batch(batch: Batch) -> None:
    """A batch is a mapping whose ``inputs`` (a tensor or a dict of tensors) hold at least one example."""
    if not isinstance(batch, Mapping) or "inputs" not in batch:
        raise ValueError("batch must be a dict with at least 'inputs' (see SafeDistiller)")
    inputs = batch["inputs"]
    first = next(iter(inputs.values()), None) if isinstance(inputs, Mapping) else inputs
    if isinstance(first, Tensor) and first.dim() > 0 and first.shape[0] == 0:
        raise ValueError("batch['inputs'] is empty (0 examples); skip empty batches before calling the distiller")


def _check_labels(batch: Batch, V: int) -> None:
    """``labels`` are ids in ``[0, V)``, or ``-100`` (not counted)."""
    labels = batch.get("labels")
    if not isinstance(labels, Tensor):
        return
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"batch['labels'] must be integer class/token ids, got {labels.dtype}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"batch['labels'] holds {int(labels[at])} at index {at}: labels must be in [0, V={V}) "
                         f"(the student's output size) or {IGNORE_INDEX} for a position that does not count")


def _broadcast_tokens(w: Tensor, token_shape: torch.Size) -> Tensor:
    """Per-scale weights ``[..., K]`` (e.g. per sequence ``[B, K]``) broadcast to ``[*token_shape, K]``."""
    while w.dim() - 1 < len(token_shape):
        w = w.unsqueeze(-2)
    return w.expand(*token_shape, w.shape[-1])


class SafeDistiller:
    """Safety-constrained multi-teacher distillation as an optimizer wrapper (``step``, ``zero_grad``,
    ``state_dict``, ``load_state_dict``).

    Args:
        student: module mapping ``batch["inputs"]`` to logits ``[..., V]``.
        teachers: ``{name: module or callable}`` returning logits ``[..., V]`` (or an output with ``.logits``;
            names = ``spec.teachers``; a :func:`~safekd.teachers.derived` teacher shares its base's forward), or
            None when every batch carries cached ``teacher_logits [..., K, V]`` or a sparse top-k cache
            (``teacher_topk_*``; teacher order = spec order).
        optimizer: the student's ``torch.optim`` optimizer (primal step).
        spec: the :class:`~safekd.spec.Spec` (teachers, constraints, dual rule, checks).
        weighting: a token-scale operator, or ``{"token": op, "task": op, "context": op}``; None = uniform.
        pool: ``pool(teacher_logprobs [..., K, V], w [..., K]) -> target_logp [..., V]`` (default linear pool).
        divergence: ``divergence(target_logp, student_logits, mask, temperature)`` with ``.sum``/``.count``
            (default forward KL).
        order: ``"simultaneous"`` (default: both steps from θ_t, λ_t), ``"dual_primal"`` (dual step first, the primal
            step with λ_{t+1}) or ``"primal_dual"`` (primal step first, then the dual step from the constraints
            re-measured at θ_{t+1} on the same batch: one more no-grad student forward); see :mod:`safekd.dual`.
        log: a :class:`~safekd.steplog.StepLog` receiving every record (rank 0 only).

    Batch keys: ``inputs``; optional ``teacher_logits``, ``labels``, ``mask`` (bool), ``task_ids``, ``context``; a
    sparse top-k teacher cache instead of ``teacher_logits``: ``teacher_topk_ids``, ``teacher_topk_logprobs``,
    ``teacher_unsafe_mass`` (see :mod:`safekd.sparse`).

    Raises:
        solvers.InfeasibleError: the static teacher-weight constraints (caps, floors, groups, order) are empty;
            the message names the conflicting constraints.
    """

    def __init__(self, student: nn.Module, teachers: Mapping[str, TeacherFn] | None, optimizer: torch.optim.Optimizer,
                 spec: Spec, *, weighting: nn.Module | Mapping[str, nn.Module] | None = None,
                 pool: Callable[[Tensor, Tensor], Tensor] | None = None,
                 divergence: Callable[..., Any] | None = None,
                 order: Literal["simultaneous", "dual_primal", "primal_dual"] = "simultaneous",
                 log: Any | None = None) -> None:
        if not isinstance(spec, Spec):
            raise TypeError(f"spec must be a safekd.Spec (see safekd.load_spec), got {type(spec).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        order = resolve_order(order)
        self.student, self.optimizer, self.spec, self.order, self.log = student, optimizer, spec, order, log
        self.teacher_names = spec.teacher_names
        self.teacher_index = spec.teacher_index
        self.K = len(self.teacher_names)
        self.teachers = self._check_teachers(teachers)
        self.weighting = self._check_weighting(weighting)
        self._builtin_pool = _default_pool()  # returns a fresh tensor: relaxed tokens are corrected in place
        self.pool = pool if pool is not None else self._builtin_pool
        self._builtin_divergence = _default_divergence()  # accepts student_logp= (shared student normaliser)
        self.divergence = divergence if divergence is not None else self._builtin_divergence
        self.static_constraints = tuple(c for c in spec.teacher_weight_constraints if not c.per_token)
        self.token_constraints = tuple(c for c in spec.teacher_weight_constraints if c.per_token)
        self.unsafe_mass_constraints = tuple(c for c in self.token_constraints if isinstance(c, C.UnsafeMass))
        self.student_constraints = spec.student_constraints
        self.convex_constraints = tuple(c for c in spec.teacher_weight_constraints if getattr(c, "convex", False))
        self._convex = C.ConvexBundle(self.convex_constraints)  # one bundle: its compiled problems are reused
        self.convex_state: dict[str, dict[int, Tensor]] = {  # stability: previous mean weights per key
            c.name: {} for c in self.convex_constraints if isinstance(c, C.Stability)}
        self._static_sets: dict[tuple[torch.dtype, torch.device], solvers.FeasibleSet] = {}
        self.static_diagnosis = solvers.require_feasible(self._static_set(torch.float64, torch.device("cpu")))
        names = [c.name for c in self.student_constraints]
        self.multipliers: dict[str, Tensor] = {n: torch.full((), float(spec.dual.init), dtype=torch.float64)
                                                for n in names}
        self.dual_optimizer = make_rule(spec.dual, list(self.multipliers.values())) if names else None
        self.meter = ConstraintMeter(names, sync=False)
        ch = spec.checks
        self.alarms = AlarmMonitor(names, ch.alarm_window, ch.alarm_min_violation, ch.alarm_level)
        self.relaxations = Relaxations(names, ch.relax_cost, ch.relax_lr if ch.relax_lr is not None else spec.dual.lr)
        self._recheck_reference = False  # the reference solver failed: re-check on the next step
        self._window: dict[str, float] = {}  # the last dual window: g_j − u_j per stepped constraint
        self.step_count = 0
        self.events = {"relaxed_tokens": 0, "corrected_tokens": 0, "alarms": 0}

    # ---------------------------------------------------------------------------------------------- set-up
    def _check_teachers(self, teachers: Mapping[str, TeacherFn] | None) -> tuple[TeacherFn, ...] | None:
        if teachers is None:
            return None
        if not isinstance(teachers, Mapping):
            raise TypeError("teachers must be a dict {name: module or callable} (or None for cached logits)")
        unknown = [n for n in teachers if n not in self.teacher_index]
        if unknown:
            raise ValueError(f"unknown teacher name(s) {unknown}; the spec's teachers are {list(self.teacher_names)}")
        missing = [n for n in self.teacher_names if n not in teachers]
        if missing:
            raise ValueError(f"teachers lacks {missing}; the spec's teachers are {list(self.teacher_names)}")
        for n, t in teachers.items():
            if not callable(t):
                raise TypeError(f"teacher {n!r} must be an nn.Module or callable, got {type(t).__name__}")
        return tuple(teachers[n] for n in self.teacher_names)

    @staticmethod
    def _check_weighting(weighting: nn.Module | Mapping[str, nn.Module] | None) -> dict[str, nn.Module]:
        if weighting is None:
            return {}
        ops = dict(weighting) if isinstance(weighting, Mapping) else {"token": weighting}
        for scale, op in ops.items():
            if scale not in SCALES:
                raise ValueError(f"weighting has unknown scale {scale!r}; scales are {list(SCALES)}")
            if not callable(op):
                raise TypeError(f"weighting[{scale!r}] must be a weight operator, got {type(op).__name__}")
            declared = getattr(op, "scale", scale)
            if declared != scale:
                raise ValueError(f"weighting[{scale!r}] is a {declared!r}-scale operator ({type(op).__name__})")
        return ops

    def _static_set(self, dtype: torch.dtype, device: torch.device) -> solvers.FeasibleSet:
        key = (dtype, device)
        if key not in self._static_sets:
            self._static_sets[key] = self.spec.static_feasible_set(dtype, device)
        return self._static_sets[key]

    # ---------------------------------------------------------------------------------------------- protocol
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the student's and the multipliers' gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if self.dual_optimizer is not None:
            self.dual_optimizer.zero_grad(set_to_none=set_to_none)

    def targets(self, batch: Batch, student_logits: Tensor | None = None) -> Targets:
        """The distillation targets of ``batch`` without a training step: teacher logits → log p_k =
        log_softmax(z_k / T_k) → per-scale weights → composition w̄_t → projection w_t = Π_{W_t}(w̄_t) → pooled
        target q_t = G(p_1..p_K; w_t) → correction of relaxed tokens (q_t(U) ≤ ε). The pipeline runs under
        ``no_grad``; ``student_logits`` (kept, with their graph, in :attr:`Targets.context`) default to a ``no_grad``
        student forward. :meth:`loss` and :func:`safekd.audit` both use it.

        Raises:
            NonFiniteError: NaN/inf in the teacher or student logits.
            ValueError: a malformed or empty batch, labels outside ``[0, V)`` other than ``-100``, or student logits
                ``[..., V]`` that do not match the teacher logits ``[..., K, V]``.
            TypeError: a teacher returned something other than a logits tensor (a tuple, a NumPy array, ...).
        """
        teacher_logits = self._teacher_logits(batch)
        if student_logits is None:
            with torch.no_grad():
                student_logits = self.student(batch["inputs"])
        return self._targets(batch, teacher_logits, student_logits)

    def loss(self, batch: Batch) -> tuple[Tensor, PendingStep]:
        """First half of a step: student forward, :meth:`targets`, the KD loss L_KD = Σ_t D(q_t ‖ p_θ) / N
        (N = global token count) and the Lagrangian ℒ = L_KD + Σ_j λ_j ĝ_j (+ Σ_j (ρ_j/2)·max(0, ĝ_j)² for the
        augmented Lagrangian), with ONE all-reduce of the stacked sums and counts of the KD loss and of every
        constraint.

        Returns ``(lagrangian, pending)``: back-propagate ``lagrangian`` (under DDP this rank's share
        S_r·W/N, whose DDP-averaged gradient is the global one), step the student's optimizer, then call
        :meth:`finish_step` with ``pending``. Student gradients are neither zeroed nor touched. The reference check
        (when due) runs here, before anything changes. With ``order="dual_primal"`` the dual step happens here and ℒ
        uses λ_{t+1}; otherwise no state changes.

        Raises:
            NonFiniteError: NaN/inf in the teacher or student logits or in the loss.
            ProjectionCheckError: the projection disagrees with the cvxpy reference (nothing has changed).
        """
        teacher_logits = self._teacher_logits(batch)
        student_logits = self.student(batch["inputs"])
        t = self._targets(batch, teacher_logits, student_logits, expand=False)
        shared = {}
        if t.sparse is not None:  # on the union support + tail buckets (safekd.sparse)
            div = t.sparse.divergence(self.divergence, student_logits, t.mask, self.spec.temperature)
        else:
            if self.divergence is self._builtin_divergence and self.spec.temperature == 1.0:
                # one student normaliser for the KD term and the constraints (unsafe_rate, kl_to, retain)
                shared["student_logp"] = t.context.student_logp = F.log_softmax(student_logits, dim=-1)
            div = self.divergence(t.target_logp, student_logits, mask=t.mask, temperature=self.spec.temperature,
                                  **shared)
        kd_loss, kd_mean, states = self._reduce_terms(t.context, div.sum, div.count)
        loss = kd_loss + self._penalty([s["proxy_residual"] for s in states], kd_loss)
        _require_finite("the loss", loss.detach())
        reference = self._reference_check(t) if self._reference_due() else None
        dual_updated = False
        if self.order == "dual_primal":
            dual_updated = self._dual_step(states)
            loss = kd_loss + self._penalty([s["proxy_residual"] for s in states], kd_loss)
        penalty = self._penalty([s["global_proxy_residual"] for s in states], kd_mean)
        return loss, PendingStep(targets=t, kd_loss=kd_mean, penalty=penalty, states=states,
                                 dual_updated=dual_updated, reference_check=reference)

    def finish_step(self, pending: PendingStep) -> StepRecord:
        """Second half of a step, once the student's optimizer has stepped: the dual step λ_j ← rule(λ_j, g_j − u_j)
        with the TRUE measured residual g_j (``simultaneous``: measured before the primal step; ``primal_dual``:
        re-measured now; every ``spec.dual.every`` calls), counters, alarms and the step log. Returns the
        :class:`StepRecord`; a pending step finishes once.

        Raises:
            MultiplierAlarmError: an alarm was raised and ``checks.on_alarm`` is ``"stop"`` (after the step is
                complete and logged).
        """
        return self._finish(pending)

    def step(self, batch: Batch) -> StepRecord:
        """One primal–dual step on ``batch``: :meth:`loss`, backward, the student's optimizer step (refused on
        NaN/inf gradients, with nothing changed: under ``order="dual_primal"`` the dual step :meth:`loss` took is
        undone), :meth:`finish_step`. Returns the :class:`StepRecord`."""
        before = self._dual_state() if self.order == "dual_primal" else None
        loss, pending = self.loss(batch)
        try:
            self.zero_grad()
            loss.backward()
            self._check_grads()
        except NonFiniteError:
            if before is not None:
                self._load_dual_state(before)
            raise
        self.optimizer.step()
        return self._finish(pending)

    def _dual_state(self) -> dict[str, Any]:
        """A copy of everything a dual step changes (J scalars and their rule's state)."""
        return copy.deepcopy({"multipliers": self.multipliers, "rule": self.dual_optimizer.state_dict()
                              if self.dual_optimizer is not None else None, "meter": self.meter.state_dict(),
                              "relaxations": self.relaxations.state_dict(), "alarms": self.alarms.state_dict(),
                              "window": self._window, "events": self.events})

    def _load_dual_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, t in state["multipliers"].items():
                self.multipliers[n].copy_(t)
        if self.dual_optimizer is not None:
            self.dual_optimizer.load_state_dict(state["rule"])
        self.meter.load_state_dict(state["meter"])
        self.relaxations.load_state_dict(state["relaxations"])
        self.alarms.load_state_dict(state["alarms"])
        self._window, self.events = state["window"], state["events"]

    # ---------------------------------------------------------------------------------------------- pieces
    def _finish(self, pending: PendingStep) -> StepRecord:
        """:meth:`finish_step`, called directly by :meth:`finish_step` and :meth:`step` (so that a
        :class:`MultiplierAlarm` warning points at their caller)."""
        if not isinstance(pending, PendingStep):
            raise TypeError(f"pending must be the PendingStep returned by loss(batch), got {type(pending).__name__}")
        if pending.finished:
            raise RuntimeError("this PendingStep was finished already; each loss(batch) is finished once")
        pending.finished = True
        t, states = pending.targets, pending.states
        dual_updated, raised = pending.dual_updated, []
        if self.order == "simultaneous":
            dual_updated = self._dual_step(states)
        elif self.order == "primal_dual":
            dual_updated = self._dual_step(self._remeasure(t))
        if dual_updated:
            raised = self._alarms()
        self.step_count += 1
        self.events["relaxed_tokens"] += t.projection["relaxed_tokens"]
        self.events["corrected_tokens"] += t.projection["corrected_tokens"]
        record = StepRecord(step=self.step_count, loss=float(pending.kd_loss + pending.penalty),
                            kd_loss=float(pending.kd_loss), penalty=float(pending.penalty),
                            constraints=self._constraint_report(states), dual_updated=dual_updated,
                            weights=self._weight_report(t.per_scale, t.composed, t.weights, t.mask),
                            projection=dict(t.projection), reference_check=pending.reference_check)
        for name, change in self._update_stability(t).items():  # measured step-to-step ℓ1 change of the means
            record.projection["convex"][name]["step_change"] = change
        record.alarms = self._standing_alarms()
        if self.log is not None and is_rank_zero():
            self.log.write(record)
        if raised and self.spec.checks.on_alarm == "stop":
            raise MultiplierAlarmError(f"step {self.step_count}: stopped on the multiplier alarm of "
                                       f"{raised} (checks.on_alarm: stop): " + record.alarms[0]["message"])
        return record

    def _remeasure(self, t: Targets) -> list[dict[str, Any]]:
        """The student constraints at θ_{t+1} on the step's batch (``order="primal_dual"``): one no-grad student
        forward; the teacher side (targets, teacher log-probabilities) is the step's."""
        batch = t.context.batch
        with torch.no_grad():
            logits = self.student(batch["inputs"])
            _require_finite("student logits (re-measured after the primal step)", logits)
            ctx = C.MeasureContext(student_logits=logits, batch=batch, teacher_logprobs=t.teacher_logp,
                                   teacher_index=self.teacher_index, unsafe=self.spec.unsafe, _mask=t.mask)
            ctx.target_logp = t.target_logp
            zero = logits.new_zeros((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
            return self._reduce_terms(ctx, zero, 0)[2]

    def _teacher_logits(self, batch: Batch) -> Tensor | SparseTeachers:
        _check_batch(batch)
        cached = batch.get("teacher_logits")
        if cached is None and batch.get("teacher_topk_ids") is not None:
            return SparseTeachers.from_batch(batch, self.K)
        if cached is not None:
            t = torch.as_tensor(cached)
            if t.dim() < 2 or t.shape[-2] != self.K:
                raise ValueError(f"batch['teacher_logits'] must be [..., K={self.K}, V] (teachers "
                                 f"{list(self.teacher_names)}), got {tuple(t.shape)}")
        elif self.teachers is None:
            raise ValueError("no teacher logits: pass teachers={name: module} or put 'teacher_logits' in the batch")
        else:
            with torch.no_grad():  # each distinct model once (derived teachers share their base's forward)
                outs = teacher_outputs(self.teachers, batch["inputs"], self.teacher_names)
            shapes = {tuple(o.shape) for o in outs}
            if len(shapes) != 1:
                raise ValueError("teachers returned logits of different shapes: " +
                                 ", ".join(f"{n}: {tuple(o.shape)}" for n, o in zip(self.teacher_names, outs)))
            t = torch.stack(outs, dim=-2)
        if not t.is_floating_point():
            raise TypeError(f"teacher logits must be floating point, got {t.dtype}")

        def which(x: Tensor) -> str:
            bad = (~torch.isfinite(x)).flatten(0, -3).any(-1).any(0) if x.dim() > 2 else (~torch.isfinite(x)).any(-1)
            return f" (teachers {[n for n, b in zip(self.teacher_names, bad.tolist()) if b]})"
        _require_finite("teacher logits", t, which)
        return t.detach()

    def _targets(self, batch: Batch, teacher_logits: Tensor | SparseTeachers, student_logits: Tensor,
                 expand: bool = True) -> Targets:
        """:meth:`targets` from teacher logits already read (so :meth:`loss` runs teachers before the student)."""
        if isinstance(teacher_logits, SparseTeachers):
            return distiller_targets(self, batch, teacher_logits, student_logits, expand)
        if not isinstance(student_logits, Tensor):
            raise TypeError(f"the student must return a logits tensor, got {type(student_logits).__name__}")
        _require_finite("student logits", student_logits.detach())
        if student_logits.shape[:-1] != teacher_logits.shape[:-2] or student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(f"student logits {tuple(student_logits.shape)} do not match teacher logits "
                             f"{tuple(teacher_logits.shape)} (expected [..., V] and [..., K, V])")
        _check_labels(batch, student_logits.shape[-1])
        with torch.no_grad():
            temps = self.spec.teacher_temperatures()
            scaled = teacher_logits if all(t == 1.0 for t in temps) else \
                teacher_logits / teacher_logits.new_tensor(temps).unsqueeze(-1)
            teacher_logp = F.log_softmax(scaled, dim=-1)
            ctx = C.MeasureContext(student_logits=student_logits, batch=batch, teacher_logprobs=teacher_logp,
                                   teacher_index=self.teacher_index, unsafe=self.spec.unsafe)
            mask = ctx.mask  # validated once, shared by the weights, the projection and every constraint
            per_scale, composed = self._weights(batch, teacher_logits, teacher_logp, student_logits, mask)
            weights, fset, relaxed, stats = self._project(composed, ctx, mask)
            convex_res = self._project_convex(composed, weights, fset, ctx, mask, stats) if self.convex_constraints \
                else {}
            weights = convex_res.pop("", weights)
            target, corrected, stats["corrected_tokens"] = self._correct(self.pool(teacher_logp, weights), relaxed,
                                                                         batch)
        ctx.target_logp = target
        return Targets(teacher_logits=teacher_logits, teacher_logp=teacher_logp, mask=mask, per_scale=per_scale,
                       composed=composed, weights=weights, feasible_set=fset, relaxed=relaxed, corrected=corrected,
                       target_logp=target, projection=stats, context=ctx, convex_residuals=convex_res)

    def _weights(self, batch: Batch, teacher_logits: Tensor | None, teacher_logp: Tensor, student_logits: Tensor,
                 mask: Tensor, sampled_logprobs: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        token_shape = mask.shape
        if not self.weighting:
            w = teacher_logp.new_full((*token_shape, self.K), 1.0 / self.K)
            return {}, w
        signals = Signals(teacher_logits=teacher_logits, teacher_logprobs=teacher_logp, labels=batch.get("labels"),
                          sampled_logprobs=sampled_logprobs,
                          task_ids=batch.get("task_ids"), context=batch.get("context"),
                          safety=self.spec.safety_scores(dtype=teacher_logp.dtype, device=teacher_logp.device),
                          student_logits=student_logits.detach(), mask=mask)
        per_scale = {s: _broadcast_tokens(op(signals).to(teacher_logp.dtype), token_shape)
                     for s, op in self.weighting.items()}
        return per_scale, compose(**per_scale).weights

    def _token_set(self, ctx: C.MeasureContext, sel: Tensor, dtype: torch.dtype) -> solvers.FeasibleSet:
        """The feasible sets of the selected tokens: the static set plus per-token rows (batch shape ``[n]``)."""
        fs = self._static_set(dtype, ctx.device)
        if not self.token_constraints:
            return fs
        for c in self.token_constraints:
            a, b = token_rows(c, ctx, sel)
            fs = fs.halfspace(a.to(dtype), b.to(dtype), name=c.name)
        return fs

    def _project(self, composed: Tensor, ctx: C.MeasureContext, mask: Tensor
                 ) -> tuple[Tensor, solvers.FeasibleSet | None, Tensor, dict[str, Any]]:
        """w_t = Π_{W_t}(w̄_t) on the unmasked tokens; returns (weights [..., K], the unmasked tokens' sets
        [N, K] (None without teacher-weight constraints or tokens), relaxed mask [...], projection stats)."""
        stats: dict[str, Any] = {"tokens": 0, "projected_tokens": 0, "active": {}, "relaxed_tokens": 0,
                                 "max_kkt_residual": 0.0}
        none_relaxed = torch.zeros_like(mask)
        if not (self.static_constraints or self.token_constraints):
            return composed, None, none_relaxed, stats
        all_tokens = bool(mask.all())
        v = composed.reshape(-1, self.K) if all_tokens else composed[mask]
        v = v.to(_projection_dtype(v))
        n = v.shape[0]
        stats["tokens"] = n
        if n == 0:
            return composed, None, none_relaxed, stats
        fs = self._token_set(ctx, mask, v.dtype)
        # Π_W(v) = v for v ∈ W: only tokens whose weights leave their set go to the solver (exact, and cheap).
        todo = (~fs.contains(v, tol=0.0)).nonzero()[:, 0]
        w = v.clone()
        relaxed = torch.zeros(n, dtype=torch.bool, device=v.device)
        stats.update(projected_tokens=int(todo.numel()))
        if todo.numel():
            # static rows are hard (their set was checked non-empty at construction); where a token's set is
            # empty only its per-token rows are relaxed, and its target is corrected afterwards
            w_sub, info = solvers.project(v[todo], fs.expand((n,))[todo], return_info=True, on_all_empty="relax")
            w_sub = w_sub.clamp_min(0)  # round-off can leave −1e-15; log w must exist
            w[todo] = w_sub / w_sub.sum(-1, keepdim=True)
            # a relaxed row may carry MAX_ITER when the solver's fallback finished it: read the relaxation itself
            relaxed[todo] = (info.status == int(solvers.Status.RELAXED)) | (info.relaxation > 1e-12)
            active = {name: int(cnt) for name, cnt in zip(fs.row_names, info.active.sum(0).tolist()) if cnt}
            for names, act in ((fs.lower_names, info.active_lower), (fs.upper_names, info.active_upper)):
                for name, cnt in zip(names, act.sum(0).tolist()):
                    if name is not None and cnt:
                        active[name] = active.get(name, 0) + int(cnt)
            ok = ~relaxed[todo]
            stats.update(active=active, max_kkt_residual=float(info.kkt_residual[ok].max()) if bool(ok.any())
                         else 0.0)
            bad = int((info.status == int(solvers.Status.NUMERICAL)).sum())
            if bad:
                logger.warning("step %d: %d token(s) failed projection verification: %s", self.step_count + 1, bad,
                               info.message)
        stats["relaxed_tokens"] = int(relaxed.sum())
        w = w.to(composed.dtype)
        if all_tokens:
            return w.reshape(composed.shape), fs, relaxed.reshape(mask.shape), stats
        return composed.index_put((mask,), w), fs, none_relaxed.index_put((mask,), relaxed), stats

    def _project_convex(self, composed: Tensor, weights: Tensor, fset: solvers.FeasibleSet | None,
                        ctx: C.MeasureContext, mask: Tensor, stats: dict[str, Any]) -> dict[str, Tensor]:
        """The convex teacher-weight constraints (:func:`solvers.convex.project_convex`): unmasked tokens whose
        polyhedral projection violates one are projected from w̄_t onto W_t ∩ {convex constraints}. Returns the
        signed residual per constraint name ``[...]`` (−inf on masked tokens) and, under ``""``, the weights."""
        from solvers.convex import project_convex

        K, all_tokens = self.K, bool(mask.all())
        dev = torch.device("cpu") if composed.device.type == "mps" else composed.device  # float64 (MPS lacks it)
        w = (weights.reshape(-1, K) if all_tokens else weights[mask]).to(dev, torch.float64)
        n = w.shape[0]
        params = self._convex.params(ctx, n, K, mask, self.convex_state, dev)
        res = self._convex.residuals(w, params)
        todo = (torch.stack(list(res.values()), -1) > 1e-9).any(-1).nonzero()[:, 0]
        stats["conic_tokens"] = 0
        if todo.numel():
            fs = fset if fset is not None else solvers.FeasibleSet.simplex(K, dtype=torch.float64, device=w.device)
            v = (composed.reshape(-1, K) if all_tokens else composed[mask]).to(dev, torch.float64)
            w_sub, info = project_convex(v[todo], fs.to(dtype=torch.float64).expand((n,))[todo], self._convex.extra,
                                         {k: p[todo] for k, p in params.items()}, return_info=True,
                                         values=self._convex.values if self._convex.has_values else None,
                                         smooth=self._convex.smooth, on_all_empty="relax")
            w_sub = w_sub.clamp_min(0)
            w[todo] = w_sub / w_sub.sum(-1, keepdim=True)
            stats["conic_tokens"] = int(info.conic.sum())
            bad = int((info.status == int(solvers.Status.NUMERICAL)).sum())
            if bad:
                logger.warning("step %d: %d token(s) failed the convex projection's verification: %s",
                               self.step_count + 1, bad, info.message)
            res = self._convex.residuals(w, params)
        stats["convex"] = {}
        for c in self.convex_constraints:  # the worst token: value = threshold ± its residual
            worst = float(res[c.name].max()) if n else -math.inf
            stats["convex"][c.name] = {
                "sense": c.sense, "threshold": c.threshold, "residual": worst,
                "value": (c.threshold + worst if c.sense == "<=" else c.threshold - worst) if n else c.threshold,
                "satisfied": worst <= c.tolerance + 1e-7, "active_tokens": int((res[c.name] > -1e-7).sum())}
        full = {name: torch.full(mask.shape, -math.inf, dtype=torch.float64, device=dev).masked_scatter(mask.to(dev), r)
                for name, r in res.items()}
        w = w.to(composed.device, composed.dtype)
        full[""] = w.reshape(composed.shape) if all_tokens else weights.index_put((mask,), w)
        return full

    def _update_stability(self, t: Targets) -> dict[str, float]:
        """Keep each stability key's mean weight of this step over all ranks (the next step's m_{t−1}: sums and
        counts per key, SUM-reduced); returns the measured ℓ1 change of the means per constraint (max over keys
        seen at both steps; 0 if none)."""
        from safekd.distributed import all_reduce_sums, get_rank

        out = {}
        w = t.weights[t.mask].to("cpu" if t.weights.device.type == "mps" else t.weights.device, torch.float64)
        for c in self.convex_constraints:
            if not isinstance(c, C.Stability):
                continue
            keys = c.keys(t.context.batch, t.mask.shape, t.mask.device)[t.mask].to(w.device)
            if bool((keys < 0).any()):
                raise ValueError(f"constraint {c.name!r}: keys (task ids / domain ids) must be >= 0")
            sizes = w.new_zeros(get_world_size())  # the largest key over ranks, by a sum of one slot per rank
            sizes[get_rank()] = float(keys.max()) + 1 if keys.numel() else 0.0
            size = int(all_reduce_sums(sizes).max())
            stats = w.new_zeros(size, self.K + 1).index_add_(0, keys, torch.cat([w, torch.ones_like(w[:, :1])], -1))
            stats = all_reduce_sums(stats).cpu()
            change, state = 0.0, self.convex_state[c.name]
            for key in (stats[:, -1] > 0).nonzero()[:, 0].tolist():
                m = stats[key, :-1] / stats[key, -1]
                if key in state:
                    change = max(change, float((m - state[key]).abs().sum()))
                state[key] = m
            out[c.name] = change
        return out

    def _correct(self, target: Tensor, relaxed: Tensor, batch: Batch) -> tuple[Tensor, Tensor, int]:
        """On relaxed tokens with q(U) > ε: q(v) ← q(v)·ε/q(U) on U and q(v)·(1−ε)/(1−q(U)) off U (uniform over the
        safe tokens when q(U) = 1). Returns the target, the corrected-token mask and its count."""
        if not self.unsafe_mass_constraints or not bool(relaxed.any()):
            return target, torch.zeros_like(relaxed), 0
        rows = relaxed.nonzero(as_tuple=True)
        sub = target[rows]  # [R, V]: only tokens whose teacher-weight set was empty
        done = torch.zeros(sub.shape[0], dtype=torch.bool, device=sub.device)
        neg_inf = torch.tensor(float("-inf"), dtype=target.dtype, device=target.device)
        for c in self.unsafe_mass_constraints:
            u = c.unsafe if c.unsafe is not None else self.spec.unsafe
            assert u is not None
            eps = c.threshold
            in_u = u.mask(target.shape[-1], batch, device=target.device)
            if in_u.dim() > 1:  # a per-position mask: the relaxed rows' masks; a vocabulary mask [V] broadcasts
                in_u = in_u.expand_as(target)[rows]
            log_unsafe = (u.log_mass(sub) if u.ids is not None else
                          torch.logsumexp(torch.where(in_u, sub, neg_inf), dim=-1)).unsqueeze(-1)
            log_safe = torch.logsumexp(torch.where(in_u, neg_inf, sub), dim=-1, keepdim=True)
            need = log_unsafe.squeeze(-1).exp() > eps * (1 + 1e-6)
            if not bool(need.any()):
                continue
            n_safe = (~in_u).sum(-1, keepdim=True).clamp_min(1).to(target.dtype)
            log_s = torch.where(log_safe > neg_inf, sub + math.log1p(-eps) - log_safe,
                                math.log1p(-eps) - n_safe.log())
            fixed = torch.where(in_u, sub + math.log(eps) - log_unsafe if eps > 0 else neg_inf, log_s)
            sub = torch.where(need.unsqueeze(-1), fixed, sub)
            done |= need
        if self.pool is self._builtin_pool:  # its fresh output: in place (no second [..., V] buffer)
            target[rows] = sub
        else:  # a user's pool may return a tensor it keeps
            target = target.index_put(rows, sub)
        corrected = torch.zeros_like(relaxed).index_put(rows, done)
        count = int(corrected.sum())
        if count:
            logger.info("step %d: corrected the pooled target on %d token(s) with empty teacher-weight sets",
                        self.step_count + 1, count)
        return target, corrected, count

    def _reduce_terms(self, ctx: C.MeasureContext, kd_sum: Tensor, kd_count: Tensor | int | float
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

    def _penalty(self, residuals: list[Tensor], like: Tensor) -> Tensor:
        """Σ_j λ_j ĝ_j (+ Σ_j (ρ_j/2)·max(0, ĝ_j)² for the augmented Lagrangian) at the current multipliers."""
        total = like.new_zeros(())
        alm = self.spec.dual.rule == "augmented_lagrangian"
        for j, (c, r) in enumerate(zip(self.student_constraints, residuals)):
            # a copy: the dual rules update λ in place, possibly before the framework back-propagates this term
            lam = self.multipliers[c.name].detach().to(like.dtype, copy=True)
            total = total + lam * r
            if alm:
                rho = float(self.dual_optimizer.penalty_coefficient(j))  # type: ignore[union-attr]
                total = total + 0.5 * rho * r.clamp_min(0).square()
        return total

    def _check_grads(self) -> None:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # one reduction and one sync for all gradients; only an overflowing sum sends them to the exact scan
        sums = [g.sum(dtype=torch.float32 if g.element_size() < 4 else None).to(torch.float64) for g in grads]
        if grads and not bool(torch.isfinite(torch.stack(sums)).all()) and not all(all_finite(g) for g in grads):
            self.optimizer.zero_grad()
            raise NonFiniteError("student gradients contain NaN or inf; the step was stopped before any parameter "
                                 "changed")

    def _dual_step(self, states: list[dict[str, Any]]) -> bool:
        """Add the step's sums and counts to the window; at its end write g_j − u_j into λ_j.grad and step the rule
        (a constraint with no measured token in the window is not stepped: no measurement, no dual step), then the
        engaged relaxations. Keeps the window's residuals in ``self._window`` for the alarms."""
        if self.dual_optimizer is None:
            return False
        self.meter.update(torch.stack([s["value"] * s["count"] for s in states]),
                          torch.stack([s["count"] for s in states]))
        if self.meter.updates < self.spec.dual.every:
            return False
        rates, counts = self.meter.compute()
        self.meter.reset()
        self._window = {}
        lams_before = {n: self.multipliers[n].detach().clone() for n in self.relaxations.engaged}
        for s, rate, seen in zip(states, rates, (counts > 0).tolist()):
            name = s["constraint"].name
            lam = self.multipliers[name]
            if not seen:
                lam.grad = None
                continue
            g = s["constraint"].residual(rate) - self.relaxations.value(name).to(rate)
            self._window[name] = float(g)
            lam.grad = torch.as_tensor(g, dtype=lam.dtype).detach().clone()
        self.dual_optimizer.step()
        self.relaxations.step(lams_before)
        assert_states_identical({**{f"multipliers[{n}]": t for n, t in self.multipliers.items()}, **{
            f"weighting[{s}].{b}": v for s, op in self.weighting.items() if isinstance(op, nn.Module)
            for b, v in op.named_buffers()}})  # DDP: every rank must hold the same λ and running statistics
        self.dual_optimizer.zero_grad(set_to_none=True)
        return True

    def _constraint_report(self, states: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for s in states:
            c = s["constraint"]
            out[c.name] = {"sense": c.sense, "threshold": c.threshold, "value": float(s["value"]),
                           "residual": float(s["residual"]), "multiplier": float(self.multipliers[c.name]),
                           "count": float(s["count"]), "satisfied": bool(float(s["residual"]) <= c.tolerance),
                           "relaxation": float(self.relaxations.value(c.name))}
        return out

    def _weight_report(self, per_scale: dict[str, Tensor], composed: Tensor, projected: Tensor,
                       mask: Tensor) -> dict[str, dict[str, float]]:
        m = mask.to(composed.dtype).unsqueeze(-1)
        denom = m.sum().clamp_min(1)
        items = {**per_scale, "composed": composed, "projected": projected}
        means = torch.stack([(w * m).flatten(0, -2).sum(0) / denom for w in items.values()]).tolist()
        return {name: dict(zip(self.teacher_names, row)) for name, row in zip(items, means)}

    # ---------------------------------------------------------------------------------------------- checks
    def _alarms(self) -> list[str]:
        """Feed the window's (λ, violation) to the alarm monitor; warn once per newly raised alarm and, with
        ``on_alarm: relax``, engage that constraint's relaxation. Returns the newly alarmed constraint names."""
        raised = []
        for name, g in self._window.items():
            if self.alarms.update(name, float(self.multipliers[name]), g):
                raised.append(name)
                self.events["alarms"] += 1
                c = next(c for c in self.student_constraints if c.name == name)
                msg = self._alarm_message(c, list(self.alarms.history[name]))
                if self.spec.checks.on_alarm == "relax":
                    self.relaxations.engaged.add(name)
                    msg += " Relaxing it (checks.on_alarm: relax): see 'relaxation' in the step record."
                logger.warning(msg)
                warnings.warn(msg, MultiplierAlarm, stacklevel=4)  # _alarms ← _finish ← step/finish_step
        return raised

    def _standing_alarms(self) -> list[dict[str, str]]:
        return [{"constraint": c.name, "message": self._alarm_message(c, list(self.alarms.history[c.name]))}
                for c in self.student_constraints if c.name in self.alarms.active]

    def _alarm_message(self, c: C.StudentConstraint, hist: list[tuple[float, float]]) -> str:
        return (f"multiplier of {c.name!r} grew over {len(hist)} dual steps ({hist[0][0]:.4g} → {hist[-1][0]:.4g}) "
                f"while its violation stayed above {self.alarms.min_violation:g} with no significant decrease "
                f"({hist[0][1]:.4g} → {hist[-1][1]:.4g}). Likely cause: the threshold {c.sense} {c.threshold:g} is "
                "unattainable for this student (or infeasible together with the KD objective and the teacher-weight "
                "constraints); consider relaxing the threshold (or checks.on_alarm: relax), tightening unsafe_mass / "
                "safety_order on the teachers, or checking that the proxy moves the measured value.")

    def _reference_due(self) -> bool:
        every = self.spec.checks.reference_every
        return bool(every and (self.token_constraints or self.static_constraints)
                    and (self._recheck_reference or (self.step_count + 1) % every == 0))

    def _reference_check(self, t: Targets) -> dict[str, Any]:
        """Re-project up to ``checks.reference_rows`` non-relaxed tokens with the cvxpy reference (float64) and
        compare with the weights of this step, before it changes anything: raise :class:`ProjectionCheckError`
        beyond tolerance. A failure of the reference solver itself is reported (``{"rows": 0, "error": ...}``) and
        the check runs again on the next step."""
        rows, mask = self.spec.checks.reference_rows, t.mask
        v_all = t.composed[mask]
        n = v_all.shape[0]
        if n == 0 or rows == 0 or t.feasible_set is None:
            return {"rows": 0, "max_abs_diff": 0.0}
        gen = torch.Generator().manual_seed(self.step_count + 1)
        idx = torch.randperm(n, generator=gen).to(v_all.device)
        idx = idx[~t.relaxed[mask][idx]]
        if t.convex_residuals:  # tokens where a convex constraint binds are verified by the convex path (KKT)
            res = torch.stack([r[mask.to(r.device)] for r in t.convex_residuals.values()], -1)
            idx = idx[~(res.amax(-1) > -1e-7).to(idx.device)[idx]]
        idx = idx[:rows]
        if idx.numel() == 0:
            return {"rows": 0, "max_abs_diff": 0.0}
        sub = t.feasible_set.to(dtype=torch.float64).expand((n,))[idx]
        try:
            ref, info = solvers.reference.project(v_all[idx].double(), sub, return_info=True)
        except (solvers.SolverError, ValueError, ArithmeticError) as exc:
            self._recheck_reference = True
            logger.warning("step %d: the reference projection failed (%s); re-checking on the next step",
                           self.step_count + 1, exc)
            return {"rows": 0, "error": str(exc)}
        self._recheck_reference = False
        keep = info.status == int(solvers.Status.OPTIMAL)
        diff = (t.weights[mask][idx].double() - ref).abs().amax(-1)[keep]
        tol = self.spec.checks.reference_tol
        tol = tol if tol is not None else (1e-5 if t.weights.dtype == torch.float64 else 1e-4)
        worst = float(diff.max()) if diff.numel() else 0.0
        if worst > tol:
            raise ProjectionCheckError(f"step {self.step_count + 1}: the batched projection disagrees with the cvxpy "
                                       f"reference on {int(keep.sum())} sampled rows: max |Δw| = {worst:.3g} > "
                                       f"tolerance {tol:g} (checks.reference_tol); the step was stopped before "
                                       "any state changed")
        return {"rows": int(keep.sum()), "max_abs_diff": worst}

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Student, optimizer, multipliers (by constraint name), dual rule, weighting buffers, meter, alarm history,
        relaxations, step counter and the spec (tensors and primitive containers only).

        A student sharded with FSDP is gathered into full tensors (:func:`~safekd.distributed.full_state_dicts`): then
        every rank must call this, and only rank 0's student and optimizer states are filled (the others' are empty).
        """
        student, optimizer = full_state_dicts(unwrap(self.student), self.optimizer)
        return {
            "step": self.step_count,
            "student": student,
            "optimizer": optimizer,
            "multipliers": {n: t.detach().clone() for n, t in self.multipliers.items()},
            "dual_optimizer": None if self.dual_optimizer is None else self.dual_optimizer.state_dict(),
            "weighting": {s: op.state_dict() for s, op in self.weighting.items() if isinstance(op, nn.Module)},
            "meter": self.meter.state_dict(),
            "alarms": self.alarms.state_dict(),
            "relaxations": self.relaxations.state_dict(),
            "recheck_reference": self._recheck_reference,
            "events": dict(self.events),
            "convex_state": {n: {str(k): m.clone() for k, m in d.items()} for n, d in self.convex_state.items()},
            "spec": self.spec.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; multipliers are matched by constraint name and checked ≥ 0. Everything is
        checked (names, shapes, optimizer groups) before anything is written: on ValueError nothing changed. The
        student and optimizer states are full tensors; a sharded student gets its shards of them (every rank calls
        this with the same state)."""
        missing = sorted(set(DISTILLER_STATE_KEYS) - set(state))
        if missing:
            raise ValueError(f"checkpoint state lacks {missing} (written by another safekd version?)")
        names = sorted(self.multipliers)
        if sorted(state["multipliers"]) != names:
            raise ValueError(f"checkpoint constraints {sorted(state['multipliers'])} != this spec's {names}")
        teachers = self.spec.to_dict()["teachers"]
        if state["spec"]["teachers"] != teachers:
            raise ValueError(f"checkpoint teachers {state['spec']['teachers']} != this spec's {teachers}")
        for n, t in state["multipliers"].items():
            if not isinstance(t, Tensor) or t.shape != () or not bool(torch.isfinite(t)) or float(t) < 0:
                raise ValueError(f"checkpoint multiplier {n!r} = {t!r} is not a finite scalar >= 0")
        _check_module_state("student", unwrap(self.student), state["student"])
        unknown = sorted(set(state["weighting"]) - set(self.weighting))
        if unknown:
            raise ValueError(f"checkpoint has weighting state for scale(s) {unknown}, which this distiller lacks")
        for s, sd in state["weighting"].items():
            _check_module_state(f"weighting[{s!r}]", self.weighting[s], sd)
        _check_optimizer_state("optimizer", self.optimizer, state["optimizer"])
        if self.dual_optimizer is not None:
            _check_optimizer_state("dual_optimizer", self.dual_optimizer, state["dual_optimizer"])
        if list(state["meter"]["names"]) != list(self.meter.names):
            raise ValueError(f"checkpoint meter constraints {state['meter']['names']} != {list(self.meter.names)}")
        if sorted(state["alarms"]["history"]) != names:
            raise ValueError(f"checkpoint alarm constraints {sorted(state['alarms']['history'])} != {names}")
        self.relaxations.check_state(state["relaxations"])
        unknown = sorted(set(state["convex_state"]) - set(self.convex_state))
        if unknown:
            raise ValueError(f"checkpoint has stability state for {unknown}, which this spec lacks")
        # validated: write
        load_full_state_dicts(unwrap(self.student), self.optimizer, state["student"], state["optimizer"])
        with torch.no_grad():
            for n, t in state["multipliers"].items():
                self.multipliers[n].copy_(t)
        if self.dual_optimizer is not None:
            self.dual_optimizer.load_state_dict(state["dual_optimizer"])
        for s, sd in state["weighting"].items():
            self.weighting[s].load_state_dict(sd)
        self.meter.load_state_dict(state["meter"])
        self.alarms.load_state_dict(state["alarms"])
        self.relaxations.load_state_dict(state["relaxations"])
        self._recheck_reference = bool(state.get("recheck_reference", False))
        self.events = dict(state["events"])
        for n, d in state["convex_state"].items():
            self.convex_state[n] = {int(k): m.to(torch.float64) for k, m in d.items()}
        self.step_count = int(state["step"])

    def save_checkpoint(self, path: str) -> None:
        """Atomic checkpoint (see :func:`safekd.checkpoint.save_checkpoint`)."""
        from safekd.checkpoint import save_checkpoint

        save_checkpoint(path, self)

    def load_checkpoint(self, path: str) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (``weights_only=True``), RNG states included."""
        from safekd.checkpoint import load_checkpoint

        load_checkpoint(path, self)


def _check_module_state(what: str, module: nn.Module, state: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first key of ``state`` that ``module.load_state_dict`` would refuse (missing,
    unexpected, or of another shape); nothing is written."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {what} does not fit: missing keys {missing}, unexpected keys {unexpected}")
    for k, t in own.items():
        v = state[k]
        if isinstance(t, Tensor) and (not isinstance(v, Tensor) or v.shape != t.shape):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"checkpoint {what}[{k!r}] has shape {got}, this model's is {tuple(t.shape)}")


def _check_optimizer_state(what: str, opt: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``state`` has ``opt``'s parameter groups, group sizes and per-parameter state
    shapes (what ``Optimizer.load_state_dict`` needs); nothing is written."""
    if not isinstance(state, Mapping) or "param_groups" not in state or "state" not in state:
        raise ValueError(f"checkpoint {what} is not an optimizer state_dict")
    groups, saved = opt.param_groups, state["param_groups"]
    if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
        raise ValueError(f"checkpoint {what} has parameter groups of sizes {[len(s['params']) for s in saved]}, "
                         f"this optimizer {[len(g['params']) for g in groups]} (another model or optimizer?)")
    params = {i: p for s, g in zip(saved, groups) for i, p in zip(s["params"], g["params"])}
    for i, st in state["state"].items():
        p = params.get(i)
        for key, v in (st.items() if isinstance(st, Mapping) else ()):
            if p is not None and isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape:
                raise ValueError(f"checkpoint {what} state {key!r} of parameter {i} has shape {tuple(v.shape)}, "
                                 f"the parameter {tuple(p.shape)}")


def _projection_dtype(v: Tensor) -> torch.dtype:
    """Weights are projected in float64 (N×K is tiny next to the vocabulary work) except where the device lacks it."""
    return v.dtype if v.device.type == "mps" else torch.float64


def _default_pool() -> Callable[[Tensor, Tensor], Tensor]:
    """Linear pool without re-validation (the distiller has checked the teacher logits already)."""
    from safekd.pooling import linear_pool

    return functools.partial(linear_pool, validate_args=False)


def _default_divergence() -> Callable[..., Any]:
    """Forward KL without re-validation (student logits and target are checked by the distiller)."""
    from safekd.divergences import forward_kl

    return functools.partial(forward_kl, validate_args=False)
