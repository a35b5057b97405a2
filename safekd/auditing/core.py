"""``audit(student, data, spec, ...)``: every constraint of a spec on (held-out) data, with one-sided bounds.

- **Student constraints** are measured with each constraint's own ``measure_batch`` (the training code), per
  example (see :mod:`safekd.auditing.measure`), and bounded in the safe direction at ``confidence``
  (Clopper–Pearson for count-based rates, empirical Bernstein for means in [0, 1], bootstrap otherwise).
  A per-slice breakdown (by ``task_ids`` / ``context`` / ``labels`` or other keys) lists the worst slices first.
- **Teacher-weight constraints** are deterministic given the teachers: they are checked on every audit token
  after the same weighting → projection → pooling pipeline as training (``unsafe_mass`` on the pooled target,
  caps/floors/groups/order/exclude on the projected weights); the "bound" is the worst token.
- The **teacher-weight picture**: mean weight per teacher per scale, by slice, how often each teacher-weight
  constraint was active, and relaxed/corrected token counts.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from safekd import constraints as C
from safekd.auditing.bounds import Bound
from safekd.auditing.measure import bound_for_units, per_example_sums, signed_slack
from safekd.auditing.provenance import provenance, read_traces
from safekd.auditing.report import AuditReport, ConstraintResult, SliceResult, TeacherWeightSummary
from safekd.spec import Spec

if TYPE_CHECKING:
    from safekd.distiller import SafeDistiller, Targets

__all__ = ["audit", "DEFAULT_SLICE_KEYS", "EXHAUSTIVE"]

logger = logging.getLogger(__name__)

DEFAULT_SLICE_KEYS = ("task_ids", "context", "labels")
EXHAUSTIVE = "exhaustive (every audit token)"
_NUM_TOL = 1e-6  # numerical slack for projected weights (the projection is exact to ~1e-9 in float64)


# ------------------------------------------------------------------------------------------------- helpers
def _distiller(spec: Spec, student: nn.Module, teachers: Mapping[str, Callable[..., Tensor]] | None,
               weighting: nn.Module | Mapping[str, nn.Module] | None, pool: Callable[[Tensor, Tensor], Tensor] | None,
               distiller: SafeDistiller | None) -> SafeDistiller:
    """The training run's distiller (checked to hold ``spec``'s teacher-weight constraints), or a fresh one whose
    :meth:`~safekd.distiller.SafeDistiller.targets` runs the training pipeline with ``weighting`` and ``pool``."""
    from safekd.distiller import SafeDistiller

    if distiller is not None:
        mine = [c.to_dict() for c in spec.teacher_weight_constraints]
        theirs = [c.to_dict() for c in distiller.spec.teacher_weight_constraints]
        if mine != theirs:
            raise ValueError(f"the distiller's teacher-weight constraints {[c['name'] for c in theirs]} differ "
                             f"from the audited spec's {[c['name'] for c in mine]}; audit with the spec the "
                             "distiller was trained with (or omit distiller=)")
        return distiller
    idle = torch.optim.SGD([p for p in student.parameters()] or [torch.zeros(1, requires_grad=True)], lr=0.0)
    return SafeDistiller(student, teachers, idle, spec, weighting=weighting, pool=pool)


def _as_batches(data: Mapping[str, Any], batch_size: int, device: torch.device) -> tuple[int, list[dict[str, Any]]]:
    if not isinstance(data, Mapping) or "inputs" not in data:
        raise ValueError("data must be a dict of tensors with at least 'inputs' (and usually 'labels')")
    x = data["inputs"]
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(f"data['inputs'] must be a tensor with a leading example axis, got {type(x).__name__}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("data['inputs'] is empty: nothing to audit")
    for k, v in data.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] != n:
            raise ValueError(f"data[{k!r}] has {v.shape[0]} rows but data['inputs'] has {n}")
        if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"data[{k!r}] contains NaN or inf")
    batches = []
    for s in range(0, n, batch_size):
        batches.append({k: (v[s:s + batch_size].to(device) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n
                            else v) for k, v in data.items()})
    return n, batches


def _slice_keys(data: Mapping[str, Any], n: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example integer slice labels ``[N]`` for each requested key present with that shape."""
    out = {}
    for k in keys:
        v = data.get(k)
        if isinstance(v, Tensor) and v.shape == (n,) and not v.is_floating_point():
            out[k] = v.detach().cpu().numpy()
    return out


def _result(c: C.Constraint, kind: str, measure: str, b: Bound, confidence: float, slices: list[SliceResult],
            description: str = "") -> ConstraintResult:
    slack = signed_slack(c.sense, b.value, c.threshold, c.tolerance)
    return ConstraintResult(name=c.name, kind=kind, measure=measure, direction=c.sense, threshold=c.threshold,
                            estimate=b.estimate, bound=b.value, bound_method=b.method, confidence=confidence,
                            slack=slack, passed=bool(slack >= 0), n=b.n, count=b.count, description=description,
                            slices=slices)


def _support(c: C.StudentConstraint) -> str:
    """What is known about the range of a constraint's per-token value (decides which bound is valid)."""
    if isinstance(c, C.KLTo):
        return "unbounded"
    if isinstance(c, C.UnsafeRate) or (isinstance(c, C.Retain) and isinstance(c.metric, str)):
        return "unit"
    return "unknown"


def _student_result(c: C.StudentConstraint, values: np.ndarray, counts: np.ndarray, confidence: float,
                    slice_labels: Mapping[str, np.ndarray], min_slice: int) -> ConstraintResult:
    support = _support(c)
    b = bound_for_units(values, counts, c.sense, confidence, support)
    slices = []
    for key, lab in slice_labels.items():
        for val in np.unique(lab):
            sel = (lab == val) & (counts > 0)
            if int(sel.sum()) < min_slice:
                continue
            sb = bound_for_units(values[sel], counts[sel], c.sense, confidence, support)
            sl = signed_slack(c.sense, sb.value, c.threshold, c.tolerance)
            slices.append(SliceResult(key=key, value=str(val.item()), n=sb.n, estimate=sb.estimate, bound=sb.value,
                                      slack=sl, passed=bool(sl >= 0), count=sb.count))
    slices.sort(key=lambda s: (math.isnan(s.slack), s.slack))
    unit = "examples" if np.all(counts[counts > 0] == 1) else "per-example means over tokens"
    desc = f"{c.kind} measured by the training code on {int((counts > 0).sum())} {unit}"
    return _result(c, "student", c.kind, b, confidence, slices, desc)


def _columns(fset: Any, name: str) -> tuple[list[int], list[int], list[int]]:
    def hit(n: str | None) -> bool:
        return n is not None and (n == name or n.startswith(name + "[") or n.startswith(name + "."))
    return ([i for i, n in enumerate(fset.row_names) if hit(n)], [i for i, n in enumerate(fset.upper_names) if hit(n)],
            [i for i, n in enumerate(fset.lower_names) if hit(n)])


def _weight_residuals(c: C.TeacherWeightConstraint, t: Targets, spec: Spec, batch: Mapping[str, Any]) -> Tensor:
    """Per-token signed residual (≤ 0 = satisfied) of a teacher-weight constraint on the audit tokens."""
    mask = t.mask
    if isinstance(c, C.ConvexWeightConstraint):  # convex constraints: measured by the distiller on every token
        r = t.convex_residuals[c.name]
        return r[mask.to(r.device)].to(t.weights.dtype)
    if isinstance(c, C.UnsafeMass):  # on the pooled target, after any correction: what the student is trained on
        u = c.unsafe if c.unsafe is not None else spec.unsafe
        assert u is not None
        return (u.mass(t.target_logp, batch) - c.threshold)[mask]
    w = t.weights[mask]
    if t.feasible_set is None:  # no unmasked token in this batch
        return w.new_full(w.shape[:1], -math.inf)
    fset = t.feasible_set.to(dtype=w.dtype)
    rows, ups, los = _columns(fset, c.name)
    if not (rows or ups or los):  # the constraint never tightened the set (e.g. a cap of 1): trivially satisfied
        return w.new_full(w.shape[:1], -math.inf)
    parts = []
    if rows:
        parts.append(fset.residual(w)[..., rows])
    upper = fset.upper.expand_as(w) if fset.upper.dim() == 1 else fset.upper
    lower = fset.lower.expand_as(w) if fset.lower.dim() == 1 else fset.lower
    if ups:
        parts.append((w - upper)[..., ups])
    if los:
        parts.append((lower - w)[..., los])
    return torch.cat(parts, dim=-1).amax(-1)


def _weight_result(c: C.TeacherWeightConstraint, resid: np.ndarray, confidence: float) -> ConstraintResult:
    worst = float(resid.max()) if resid.size else -math.inf
    value = c.threshold + worst if c.sense == "<=" else c.threshold - worst
    if not math.isfinite(value):
        value = c.threshold
    violating = int((resid > c.tolerance + _NUM_TOL).sum())
    b = Bound(estimate=value, value=value, side="upper" if c.sense == "<=" else "lower", confidence=confidence,
              method=EXHAUSTIVE, n=int(resid.size), count=float(violating))
    kind = "target" if isinstance(c, C.UnsafeMass) else "teacher_weight"
    measure = "pooled-target unsafe mass (worst token)" if kind == "target" else f"{c.kind} (worst token)"
    slack = signed_slack(c.sense, value, c.threshold, c.tolerance + _NUM_TOL)
    return ConstraintResult(name=c.name, kind=kind, measure=measure, direction=c.sense, threshold=c.threshold,
                            estimate=value, bound=value, bound_method=EXHAUSTIVE, confidence=confidence,
                            slack=slack, passed=violating == 0, n=int(resid.size), count=float(violating),
                            description=f"{violating} of {resid.size} audit tokens violate it")


# --------------------------------------------------------------------------------------------------- audit
def audit(student: nn.Module, data: Mapping[str, Any], spec: Spec,
          teachers: Mapping[str, Callable[..., Tensor]] | None = None, confidence: float = 0.95,
          step_log: str | None = None, *, weighting: nn.Module | Mapping[str, nn.Module] | None = None,
          pool: Callable[[Tensor, Tensor], Tensor] | None = None, distiller: Any | None = None,
          batch_size: int = 512, slice_keys: Sequence[str] = DEFAULT_SLICE_KEYS, min_slice: int = 5,
          seed: int | None = None, metrics: Mapping[str, float] | None = None, progress: bool = False
          ) -> AuditReport:
    """Audit ``student`` on ``data`` against every constraint of ``spec`` at one-sided ``confidence``.

    Args:
        student: maps ``data["inputs"]`` batches to logits ``[..., V]`` (evaluated under ``no_grad``, eval mode).
        data: dict of tensors with a leading example axis: ``inputs``, usually ``labels``; optional ``mask``,
            ``task_ids``, ``context``, other slice keys, and cached ``teacher_logits [N, ..., K, V]``.
        spec: the :class:`~safekd.spec.Spec` whose constraints are audited.
        teachers: ``{name: callable}`` giving teacher logits, when ``data`` has no ``teacher_logits``.
        confidence: one-sided confidence of every bound, in (0, 1).
        step_log: JSONL step log of the training run (adds the training traces).
        weighting, pool, distiller: the training run's weighting operators / pool (or the distiller itself) so the
            teacher-weight picture matches training; default uniform weights and the linear pool.
        slice_keys: per-example integer keys to break student constraints down by (worst slices first).
        metrics: extra numbers to carry into the report (e.g. a baseline's accuracy).

    Returns:
        An :class:`~safekd.auditing.report.AuditReport`; ``report.passed`` iff every constraint passes.
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a safekd Spec (see safekd.load_spec), got {type(spec).__name__}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next((p.device for p in student.parameters()), torch.device("cpu"))
    n, batches = _as_batches(data, batch_size, device)
    have_teachers = teachers is not None or "teacher_logits" in data or distiller is not None
    weight_cons = spec.teacher_weight_constraints
    needs = [c.name for c in weight_cons] + [c.name for c in spec.student_constraints if isinstance(c, C.KLTo)]
    if needs and not have_teachers:
        raise ValueError(f"constraints {needs} need teacher outputs: pass teachers={{name: model}} or put "
                         "'teacher_logits' [N, K, V] in the audit data")
    view = _distiller(spec, student, teachers, weighting, pool, distiller) if have_teachers else None
    K = len(spec.teacher_names)

    was_training = student.training
    student.eval()
    s_vals: dict[str, list[Tensor]] = {c.name: [] for c in spec.student_constraints}
    s_cnts: dict[str, list[Tensor]] = {c.name: [] for c in spec.student_constraints}
    w_resid: dict[str, list[Tensor]] = {c.name: [] for c in weight_cons}
    per_example_w: dict[str, list[Tensor]] = {}
    active: dict[str, int] = {}
    tokens = relaxed = corrected = 0
    correct = total = 0.0
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc="audit", unit="batch", disable=not progress, leave=False):
            with torch.no_grad():
                logits = student(batch["inputs"])
            if not isinstance(logits, Tensor) or not bool(torch.isfinite(logits).all()):
                raise ValueError("the student returned non-finite logits (NaN/inf) on the audit data")
            out = view.targets(batch, logits) if view is not None else None
            for c in spec.student_constraints:
                v, cnt = per_example_sums(c, logits, batch, teacher_logprobs=None if out is None else out.teacher_logp,
                                          teacher_names=spec.teacher_names, unsafe=spec.unsafe,
                                          target_logp=None if out is None else out.target_logp)
                s_vals[c.name].append(v.double().cpu())
                s_cnts[c.name].append(cnt.double().cpu())
            mask = batch.get("mask")
            m = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device) if mask is None else mask
            if "labels" in batch:
                labels = batch["labels"]
                ok = m & (labels >= 0)
                correct += float(((logits.argmax(-1) == labels) & ok).sum())
                total += float(ok.sum())
            if out is not None:
                for c in weight_cons:
                    w_resid[c.name].append(_weight_residuals(c, out, spec, batch).double().cpu())
                mf = out.mask.to(out.weights.dtype).unsqueeze(-1)
                scales = {**out.per_scale, "composed": out.composed, "final": out.weights}
                for scale, w in scales.items():  # per-example mean over unmasked tokens → [B, K]
                    wt = (w * mf).reshape(w.shape[0], -1, K).sum(1) / mf.reshape(w.shape[0], -1, 1).sum(1).clamp_min(1)
                    per_example_w.setdefault(scale, []).append(wt.double().cpu())
                for name, cnt in out.projection["active"].items():
                    active[name] = active.get(name, 0) + int(cnt)
                tokens += int(out.mask.sum())
                relaxed += int(out.relaxed.sum())
                corrected += out.projection["corrected_tokens"]
    finally:
        student.train(was_training)

    slice_labels = _slice_keys(data, n, slice_keys)
    results: list[ConstraintResult] = []
    for c in spec.constraints:
        if isinstance(c, C.StudentConstraint):
            results.append(_student_result(c, torch.cat(s_vals[c.name]).numpy(), torch.cat(s_cnts[c.name]).numpy(),
                                           confidence, slice_labels, min_slice))
        else:
            results.append(_weight_result(c, torch.cat(w_resid[c.name]).numpy(), confidence))

    tw = None
    if per_example_w:
        ew = {s: torch.cat(v) for s, v in per_example_w.items()}
        by_slice = {}
        fin = ew["final"].numpy()
        for key, lab in slice_labels.items():
            vals = np.unique(lab)
            by_slice[key] = {"values": [str(v.item()) for v in vals],
                             "mean_weight": [fin[lab == v].mean(0).tolist() for v in vals]}
        tw = TeacherWeightSummary(
            teachers=list(spec.teacher_names),
            mean_weight={s: w.mean(0).tolist() for s, w in ew.items()}, by_slice=by_slice,
            active_fraction={k: v / max(tokens, 1) for k, v in sorted(active.items())},
            relaxed_tokens=relaxed, corrected_tokens=corrected, total_tokens=tokens)

    all_metrics = {"accuracy": correct / total if total else float("nan"), "examples": float(n)}
    all_metrics.update({k: float(v) for k, v in (metrics or {}).items()})
    failed = [r.name for r in results if not r.passed]
    message = (f"all {len(results)} constraints pass at {confidence:.0%} confidence on {n} examples" if not failed else
               f"{len(failed)} of {len(results)} constraints FAIL at {confidence:.0%} confidence on {n} examples: "
               + ", ".join(failed))
    traces = read_traces(step_log, list(spec.teacher_names)) if step_log is not None else None
    return AuditReport(passed=not failed, message=message, confidence=float(confidence), constraints=results,
                       metrics=all_metrics, provenance=provenance(spec.to_dict(), student, n, seed),
                       teacher_weights=tw, traces=traces)
