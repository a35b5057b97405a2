"""`SafeDistiller`: a torch.optim-style wrapper running one safety-constrained distillation step per batch.

The distiller is the conductor of three parts:

* the target pipeline (:class:`~safekd.targets.TargetPipeline`): teacher log-probabilities log p_k =
  log_softmax(z_k / T_k) → per-scale weights → composition w̄_t → projection w_t = Π_{W_t}(w̄_t) → pooled target
  q_t = G(p_1..p_K; w_t), corrected where W_t was empty (q_t(U) ≤ ε);
* the Lagrangian (:class:`~safekd.lagrangian.Lagrangian`): ℒ = L_KD + Σ_j λ_j ĝ_j (+ (ρ_j/2)·max(0, ĝ_j)² for the
  augmented Lagrangian), with L_KD = Σ_t D(q_t ‖ p_θ) / #tokens and ĝ_j the signed residual of constraint j's
  differentiable proxy (g ≤ 0 convention);
* the dual state (:class:`~safekd.dual.DualState`): λ_j ← rule(λ_j, g_j − u_j) with the TRUE measured residual g_j
  (every ``spec.dual.every`` steps, from sums and counts accumulated over the window; u_j the resilient relaxation),
  the alarms and the relaxations, in the ``order`` of :mod:`safekd.dual`.

Per step: teacher logits, student forward (NaN/inf raise :class:`NonFiniteError` before anything changes), targets,
Lagrangian, backward, primal step, dual step, record. Public surface: ``targets(batch, student_logits=None) ->
Targets`` (the audit's view), ``loss(batch) -> (lagrangian, PendingStep)`` and ``finish_step(pending) ->
StepRecord`` (the dual half, record, log): ``step`` = loss → backward → optimizer step → finish_step, and training
frameworks that own backward and the optimizer call ``loss`` and ``finish_step`` themselves.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from safekd.training.checkpoint import DISTILLER_STATE_KEYS, check_module_state, check_optimizer_state
from safekd.common.distributed import full_state_dicts, is_rank_zero, load_full_state_dicts, unwrap
from safekd.training.dual import DualState, MultiplierAlarm, MultiplierAlarmError, resolve_order
from safekd.training.lagrangian import Lagrangian, default_divergence
from safekd.targets.head import StudentHidden
from safekd.targets.signals import all_finite
from safekd.targets.sparse import SparseTeachers
from safekd.spec.document import Spec
from safekd.targets.pipeline import (Batch, NonFiniteError, ProjectionCheckError, TargetPipeline, Targets, TeacherFn,
                                     projection_stats, require_finite, weight_report)

__all__ = ["SafeDistiller", "StepRecord", "Targets", "PendingStep", "NonFiniteError", "ProjectionCheckError",
           "MultiplierAlarm", "MultiplierAlarmError"]


@dataclass
class StepRecord:
    """What one step did. ``constraints[name]`` = {sense, value, threshold, residual, multiplier, count,
    satisfied (residual ≤ tolerance), relaxation (u ≥ 0: the threshold in force is threshold + u for ``<=``,
    threshold − u for ``>=``; 0 unless ``on_alarm: relax`` engaged it)};
    ``weights[scale][teacher]`` = mean weight over unmasked tokens for each scale, ``composed`` and ``projected``;
    ``projection`` = {tokens (unmasked), projected_tokens (outside their set, sent to the solver), active (per
    constraint name), relaxed_tokens, uncertified_tokens (targets computed in a compiled graph only: tokens the
    fixed-shape projection could not certify, counted among the relaxed ones), corrected_tokens, max_kkt_residual};
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



class SafeDistiller:
    """Safety-constrained multi-teacher distillation as an optimizer wrapper (``step``, ``zero_grad``,
    ``state_dict``, ``load_state_dict``).

    Args:
        student: module mapping ``batch["inputs"]`` to logits ``[..., V]``, or to a
            :class:`~safekd.head.StudentHidden` (hidden states + LM head: with sparse teachers the step reads the head
            in chunks of tokens and never holds the ``[..., V]`` logits or their gradient).
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
        self.pipeline = TargetPipeline(spec, teachers, weighting, pool, lambda: self.step_count)
        self._builtin_divergence = default_divergence()  # accepts student_logp= (shared student normaliser)
        self.divergence = divergence if divergence is not None else self._builtin_divergence
        self.dual = DualState(spec)
        self.lagrangian = Lagrangian(spec, self.dual)
        self.step_count = 0
        # the parts' state under the names the distiller has always had (the same objects)
        p, d = self.pipeline, self.dual
        self.teacher_names, self.teacher_index, self.K = p.teacher_names, p.teacher_index, p.K
        self.weighting, self.pool, self.convex_state = p.weighting, p.pool, p.convex_state
        self.student_constraints, self.static_diagnosis = spec.student_constraints, p.static_diagnosis
        self.multipliers, self.dual_optimizer = d.multipliers, d.rule
        self.meter, self.alarms, self.relaxations = d.meter, d.alarms, d.relaxations

    @property
    def events(self) -> dict[str, int]:
        """Counts over the run: relaxed and corrected tokens, raised alarms."""
        return self.dual.events

    # ---------------------------------------------------------------------------------------------- protocol
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the student's and the multipliers' gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if self.dual_optimizer is not None:
            self.dual_optimizer.zero_grad(set_to_none=set_to_none)

    def targets(self, batch: Batch, student_logits: Tensor | None = None, *, expand: bool = True) -> Targets:
        """The distillation targets of ``batch`` without a training step: teacher logits → log p_k =
        log_softmax(z_k / T_k) → per-scale weights → composition w̄_t → projection w_t = Π_{W_t}(w̄_t) → pooled
        target q_t = G(p_1..p_K; w_t) → correction of relaxed tokens (q_t(U) ≤ ε). The pipeline runs under
        ``no_grad``; ``student_logits`` (kept, with their graph, in :attr:`Targets.context`) default to a ``no_grad``
        student forward. :meth:`loss` and :func:`safekd.audit` both use it. With a sparse top-k cache,
        ``expand=False`` keeps the bucket view in ``teacher_logp`` / ``target_logp`` (dense ``[..., K, V]`` /
        ``[..., V]`` only where a student constraint reads them; the audit's and the monitor's choice).

        Raises:
            NonFiniteError: NaN/inf in the teacher or student logits.
            ValueError: a malformed or empty batch, labels outside ``[0, V)`` other than ``-100``, or student logits
                ``[..., V]`` that do not match the teacher logits ``[..., K, V]``.
            TypeError: a teacher returned something other than a logits tensor (a tuple, a NumPy array, ...).
        """
        teacher_logits = self.pipeline.teacher_logits(batch)
        if student_logits is None:
            with torch.no_grad():
                student_logits = self.student(batch["inputs"])
        if isinstance(student_logits, StudentHidden):  # the audit's view is dense: [..., V] logits
            student_logits = student_logits.logits()
        return self.pipeline(batch, student_logits, teacher_logits, expand=expand)

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
        teacher_logits = self.pipeline.teacher_logits(batch)
        student_logits = self.student(batch["inputs"])
        if isinstance(student_logits, StudentHidden) and not isinstance(teacher_logits, SparseTeachers):
            student_logits = student_logits.logits()  # dense teachers read [..., V] anyway
        t = self.pipeline(batch, student_logits, teacher_logits, expand=False)
        div = self.lagrangian.kd_divergence(t, student_logits, self.divergence,
                                            builtin=self.divergence is self._builtin_divergence)
        kd_loss, kd_mean, states = self.lagrangian.reduce_terms(t.context, div.sum, div.count)
        loss = kd_loss + self.lagrangian.penalty([s["proxy_residual"] for s in states], kd_loss)
        require_finite("the loss", loss.detach())
        reference = self.pipeline.reference_check(t) if self.pipeline.reference_due() else None
        dual_updated = False
        if self.order == "dual_primal":
            dual_updated = self._dual_step(states)
            loss = kd_loss + self.lagrangian.penalty([s["proxy_residual"] for s in states], kd_loss)
        penalty = self.lagrangian.penalty([s["global_proxy_residual"] for s in states], kd_mean)
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
        before = self.dual.snapshot() if self.order == "dual_primal" else None
        loss, pending = self.loss(batch)
        try:
            self.zero_grad()
            loss.backward()
            self._check_grads()
        except NonFiniteError:
            if before is not None:
                self.dual.restore(before)
            raise
        self.optimizer.step()
        return self._finish(pending)


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
            dual_updated = self._dual_step(self.lagrangian.remeasure(self.student, t))
        if dual_updated:
            raised = self.dual.raise_alarms()
        self.step_count += 1
        projection = projection_stats(t.projection)  # a compiled pipeline's tensors are read here, after the graph
        self.events["relaxed_tokens"] += projection["relaxed_tokens"]
        self.events["corrected_tokens"] += projection["corrected_tokens"]
        record = StepRecord(step=self.step_count, loss=float(pending.kd_loss + pending.penalty),
                            kd_loss=float(pending.kd_loss), penalty=float(pending.penalty),
                            constraints=self.dual.report(states), dual_updated=dual_updated,
                            weights=weight_report(t, self.teacher_names),
                            projection=projection, reference_check=pending.reference_check)
        for name, change in self.pipeline.update_stability(t).items():  # measured step-to-step ℓ1 change of the means
            record.projection["convex"][name]["step_change"] = change
        record.alarms = self.dual.standing_alarms()
        if self.log is not None and is_rank_zero():
            self.log.write(record)
        if raised and self.spec.checks.on_alarm == "stop":
            raise MultiplierAlarmError(f"step {self.step_count}: stopped on the multiplier alarm of "
                                       f"{raised} (checks.on_alarm: stop): " + record.alarms[0]["message"])
        return record

    def _check_grads(self) -> None:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # one reduction and one sync for all gradients; only an overflowing sum sends them to the exact scan
        sums = [g.sum(dtype=torch.float32 if g.element_size() < 4 else None).to(torch.float64) for g in grads]
        if grads and not bool(torch.isfinite(torch.stack(sums)).all()) and not all(all_finite(g) for g in grads):
            self.optimizer.zero_grad()
            raise NonFiniteError("student gradients contain NaN or inf; the step was stopped before any parameter "
                                 "changed")

    def _dual_step(self, states: list[dict[str, Any]]) -> bool:
        """The dual step of :class:`~safekd.dual.DualState` (weighting buffers, like λ, identical on every rank)."""
        return self.dual.step(states, {f"weighting[{s}].{b}": v for s, op in self.weighting.items()
                                       if isinstance(op, nn.Module) for b, v in op.named_buffers()})

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Student, optimizer, multipliers (by constraint name), dual rule, weighting buffers, meter, alarm history,
        relaxations, step counter and the spec (tensors and primitive containers only).

        A student sharded with FSDP is gathered into full tensors (:func:`~safekd.distributed.full_state_dicts`): then
        every rank must call this, and only rank 0's student and optimizer states are filled (the others' are empty).
        """
        student, optimizer = full_state_dicts(unwrap(self.student), self.optimizer)
        dual, targets = self.dual.state_dict(), self.pipeline.state_dict()
        return {
            "step": self.step_count,
            "student": student,
            "optimizer": optimizer,
            "multipliers": dual["multipliers"],
            "dual_optimizer": dual["dual_optimizer"],
            "weighting": {s: op.state_dict() for s, op in self.weighting.items() if isinstance(op, nn.Module)},
            "meter": dual["meter"],
            "alarms": dual["alarms"],
            "relaxations": dual["relaxations"],
            "recheck_reference": targets["recheck_reference"],
            "events": dual["events"],
            "convex_state": targets["convex_state"],
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
        self.dual.check_state(state)
        teachers = self.spec.to_dict()["teachers"]
        if state["spec"]["teachers"] != teachers:
            raise ValueError(f"checkpoint teachers {state['spec']['teachers']} != this spec's {teachers}")
        check_module_state("student", unwrap(self.student), state["student"])
        unknown = sorted(set(state["weighting"]) - set(self.weighting))
        if unknown:
            raise ValueError(f"checkpoint has weighting state for scale(s) {unknown}, which this distiller lacks")
        for s, sd in state["weighting"].items():
            check_module_state(f"weighting[{s!r}]", self.weighting[s], sd)
        check_optimizer_state("optimizer", self.optimizer, state["optimizer"])
        self.pipeline.check_state(state)
        # validated: write
        load_full_state_dicts(unwrap(self.student), self.optimizer, state["student"], state["optimizer"])
        self.dual.load_state_dict(state)
        for s, sd in state["weighting"].items():
            self.weighting[s].load_state_dict(sd)
        self.pipeline.load_state_dict(state)
        self.step_count = int(state["step"])

    def save_checkpoint(self, path: str) -> None:
        """Atomic checkpoint (see :func:`safekd.checkpoint.save_checkpoint`)."""
        from safekd.training.checkpoint import save_checkpoint

        save_checkpoint(path, self)

    def load_checkpoint(self, path: str) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (``weights_only=True``), RNG states included."""
        from safekd.training.checkpoint import load_checkpoint

        load_checkpoint(path, self)

