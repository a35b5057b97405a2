"""``audit(student, data, spec, ...)``: every constraint of a spec on (held-out) data, with one-sided bounds.

- **Student constraints** are measured with each constraint's own ``measure_batch`` (the training code) per
  independent unit (example, or ``group_ids`` group; see :mod:`safekd.auditing.measure`) and bounded in the safe
  direction for the support they declare. The verdict compares the bound with the threshold alone.
  A per-slice breakdown (``task_ids`` / ``context`` / ``labels`` or other keys) lists the worst slices first;
  slices below ``min_slice`` units are listed as not bounded; slice bounds are Bonferroni-corrected by default.
- **Teacher-weight constraints** are checked on every audit token after the spec's weighting → projection →
  pooling pipeline (the spec's projection of the audit data); with a step log, cap / floor rows also check the
  training record of the projected weights.
- The data is streamed batch by batch (:func:`safekd.batches.iter_batches`): memory is bounded by one batch plus
  per-unit sums and counts.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from safekd.spec import constraints as C
from safekd.auditing.bounds import BETTING, Bound, check_level
from safekd.auditing.measure import (bound_for_units, check_support, per_example_sums, per_group_sums,
                                     signed_slack, support_label)
from safekd.auditing.provenance import provenance, read_traces, weight_record
from safekd.auditing.report import (FAIL, NOT_BOUNDED, NOT_CERTIFIED, PASS, AuditReport, ConstraintResult,
                                    SliceResult, TeacherWeightSummary, format_confidence)
from safekd.common.batches import default_mask, iter_batches
from safekd.targets.signals import all_finite
from safekd.spec.document import Spec
from safekd.targets.teachers import logits_of

if TYPE_CHECKING:
    from safekd.training.distiller import SafeDistiller, Targets

__all__ = ["audit", "DEFAULT_SLICE_KEYS", "EXHAUSTIVE", "ROUND_OFF"]


DEFAULT_SLICE_KEYS = ("task_ids", "context", "labels")
EXHAUSTIVE = "exhaustive (every audit token)"
ROUND_OFF = 1e-6  # projected weights are exact to ~1e-9 in float64; shown in the report as numerical_tolerance
_TEACHER_KEYS = ("teacher_logits", "teacher_topk_ids")


# ------------------------------------------------------------------------------------------------- helpers
def _distiller(spec: Spec, student: nn.Module, teachers: Mapping[str, Callable[..., Tensor]] | None,
               weighting: nn.Module | Mapping[str, nn.Module] | None, pool: Callable[[Tensor, Tensor], Tensor] | None,
               distiller: SafeDistiller | None) -> SafeDistiller:
    """The training run's distiller (checked to hold ``spec``'s teacher-weight constraints), or a fresh one whose
    :meth:`~safekd.distiller.SafeDistiller.targets` runs the training pipeline with ``weighting`` and ``pool``."""
    from safekd.training.distiller import SafeDistiller

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


def _check_finite(batch: Mapping[str, Any], i: int) -> None:
    """One reduction per floating tensor the audit reads (no whole-tensor isfinite copy unless a sum overflows)."""
    for k, v in batch.items():
        parts = v.items() if isinstance(v, Mapping) else [(None, v)]
        for sub, t in parts:
            if isinstance(t, Tensor) and k != "teacher_topk_logprobs" and not all_finite(t):
                where = f"data[{k!r}]" + (f"[{sub!r}]" if sub is not None else "")
                raise ValueError(f"{where} contains NaN or inf (audit batch {i})")


def _unit_keys(batch: Mapping[str, Any], B: int, token_shape: torch.Size, offset: int, grouped: bool) -> tuple[np.ndarray | None, Tensor | None]:
    """(per-example unit keys [B], or None with per-token group ids): examples by running index, or ``group_ids``."""
    gid = batch.get("group_ids")
    if (gid is not None) != grouped:
        raise ValueError("'group_ids' must be in every audit batch or in none (it names the independent unit)")
    if gid is None:
        return np.arange(offset, offset + B, dtype=np.int64), None
    if not isinstance(gid, Tensor) or gid.is_floating_point() or gid.dtype == torch.bool:
        raise ValueError(f"data['group_ids'] must be an integer tensor [B] or per token, got "
                         f"{getattr(gid, 'dtype', type(gid).__name__)}")
    if gid.shape == (B,):
        return gid.detach().cpu().numpy().astype(np.int64), None
    if gid.shape == token_shape:
        return None, gid
    raise ValueError(f"data['group_ids'] has shape {tuple(gid.shape)}; expected [{B}] (per example) or "
                     f"{list(token_shape)} (per token)")


class _Units:
    """Per-unit sums and counts of one constraint, accumulated batch by batch and summed per key at the end."""

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []

    def add(self, keys: np.ndarray, v: Tensor, c: Tensor) -> None:
        self.keys.append(keys)
        self.values.append(v.double().cpu().numpy())
        self.counts.append(c.double().cpu().numpy())

    def sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys, inv = np.unique(np.concatenate(self.keys), return_inverse=True)
        return (keys, np.bincount(inv, np.concatenate(self.values), keys.size),
                np.bincount(inv, np.concatenate(self.counts), keys.size))


def _unit_labels(pairs: list[tuple[np.ndarray, np.ndarray]], keys: np.ndarray) -> np.ndarray:
    """Each unit's slice label (its first example's), aligned with ``keys``."""
    k = np.concatenate([p[0] for p in pairs])
    lab = np.concatenate([p[1] for p in pairs])
    uk, first = np.unique(k, return_index=True)
    return lab[first][np.searchsorted(uk, keys)]


def _status(b: Bound, slack: float) -> str:
    return NOT_CERTIFIED if not b.certifies else (PASS if slack >= 0 else FAIL)


def _student_result(c: C.StudentConstraint, v: np.ndarray, n: np.ndarray, labels: Mapping[str, np.ndarray],
                    confidence: float, min_slice: int, slice_correction: str, unit: str, seed: int,
                    resamples: int, max_unit_count: float | None) -> ConstraintResult:
    support = c.value_support
    check_support(c.name, support, v, n)
    if max_unit_count is not None and n.size and n.max() > max_unit_count:
        raise ValueError(f"constraint {c.name!r}: a unit counts {n.max():g} items > max_unit_count {max_unit_count:g}")
    b = bound_for_units(v, n, c.sense, confidence, support, seed=seed, resamples=resamples,
                        max_unit_count=max_unit_count)
    slack = signed_slack(c.sense, b.value, c.threshold)
    status = _status(b, slack)
    # slices: list every value; bound those with at least min_slice units, Bonferroni over the bounded ones
    cells = [(key, val, (lab == val) & (n > 0)) for key, lab in labels.items() for val in np.unique(lab[n > 0])]
    bounded = sum(int(sel.sum()) >= min_slice for _, _, sel in cells)
    alpha = 1.0 - confidence
    s_conf = 1.0 - alpha / max(bounded, 1) if slice_correction == "bonferroni" else confidence
    slices = []
    for key, val, sel in cells:
        k = int(sel.sum())
        est = float(v[sel].sum() / n[sel].sum()) if k else math.nan
        if k < min_slice or status == NOT_CERTIFIED:
            slices.append(SliceResult(key=key, value=str(val.item()), n=k, estimate=est, bound=math.nan,
                                      slack=math.nan, passed=False, count=float(v[sel].sum()),
                                      status=NOT_BOUNDED if k < min_slice else NOT_CERTIFIED, confidence=None))
            continue
        sb = bound_for_units(v[sel], n[sel], c.sense, s_conf, support, seed=seed, max_unit_count=max_unit_count)
        sl = signed_slack(c.sense, sb.value, c.threshold)
        slices.append(SliceResult(key=key, value=str(val.item()), n=sb.n, estimate=sb.estimate, bound=sb.value,
                                  slack=sl, passed=sl >= 0, count=sb.count, status=PASS if sl >= 0 else FAIL,
                                  confidence=s_conf))
    slices.sort(key=lambda s: (math.isnan(s.slack), s.slack if not math.isnan(s.slack) else -s.estimate))
    counted = n[n > 0]
    ratio = bool(counted.size) and not bool(np.all(counted == 1))
    estimand = ("ratio of sums Σv/Σc over units (the training measurement; a token rate for token data)" if ratio
                else "mean over units (one counted item each)")
    desc = (f"{c.kind} measured by the training code on {int(counted.size)} {unit}s"
            + (f" ({int(counted.sum())} counted items)" if ratio else ""))
    if b.method == BETTING and ratio:
        desc += (f"; units scaled by the declared max_unit_count {max_unit_count:g}" if max_unit_count is not None
                 else f"; units scaled by the largest unit's count {counted.max():g} (read from the data)")
    if status == NOT_CERTIFIED:
        desc += "; no declared support, so no finite-sample bound: the bootstrap bound is an estimate only"
    return ConstraintResult(name=c.name, kind="student", measure=c.kind, direction=c.sense, threshold=c.threshold,
                            estimate=b.estimate, bound=b.value, bound_method=b.method, confidence=confidence,
                            slack=slack, passed=status == PASS, status=status, n=b.n, count=b.count,
                            description=desc, slices=slices, tolerance=c.tolerance, train_threshold=c.train_threshold,
                            estimand=estimand, unit=unit, support=support_label(support), seed=b.seed,
                            resamples=b.resamples)


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
        q_u = u.mass(t.target_logp, batch) if t.sparse is None else t.sparse.unsafe_mass(u, batch)  # bucket view
        return (q_u - c.threshold)[mask]
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


_PROJECTION = "the spec's projection of the audit data (what training with this spec feeds a student on these inputs)"


def _weight_result(c: C.TeacherWeightConstraint, worst: float, violating: int, tokens: int, confidence: float,
                   record: Mapping[str, tuple[float, float, int]] | None) -> ConstraintResult:
    value = c.threshold + worst if c.sense == "<=" else c.threshold - worst
    if not math.isfinite(value):
        value = c.threshold
    kind = "target" if isinstance(c, C.UnsafeMass) else "teacher_weight"
    measure = "pooled-target unsafe mass (worst token)" if kind == "target" else f"{c.kind} (worst token)"
    passed = violating == 0
    desc = f"{violating} of {tokens} audit tokens exceed the threshold by more than {ROUND_OFF:g} (round-off)"
    source = _PROJECTION + (", not a record of how the audited student was trained; pass the step log to check "
                            "the training record" if record is None else "")
    teacher = getattr(c, "teacher", None)
    if record is not None:
        if isinstance(c, (C.Cap, C.Floor)) and teacher in record:
            lo, hi, steps = record[teacher]
            broke = hi > c.threshold + ROUND_OFF if isinstance(c, C.Cap) else lo < c.threshold - ROUND_OFF
            seen = hi if isinstance(c, C.Cap) else lo
            source += (f"; training record (step log, {steps} steps): batch-mean projected weight of {teacher!r} "
                       f"reached {seen:.4g}" + (" — violated during training" if broke else ""))
            passed = passed and not broke
        else:
            source += "; the step log holds no per-step record of this constraint"
    return ConstraintResult(name=c.name, kind=kind, measure=measure, direction=c.sense, threshold=c.threshold,
                            estimate=value, bound=value, bound_method=EXHAUSTIVE, confidence=confidence,
                            slack=signed_slack(c.sense, value, c.threshold), passed=passed,
                            status=PASS if passed else FAIL, n=tokens, count=float(violating), description=desc,
                            tolerance=c.tolerance, estimand="worst audit token", unit="token",
                            support="deterministic given the teachers", numerical_tolerance=ROUND_OFF, source=source)


def _message(results: list[ConstraintResult], confidence: float, units: int, simultaneous: bool, m: int) -> str:
    pct = format_confidence(confidence)
    failed = [r.name for r in results if r.status == FAIL]
    uncertified = [r.name for r in results if r.status == NOT_CERTIFIED]
    how = (f"simultaneous bounds (each student bound at 1 − α/{m})" if simultaneous and m > 1 else
           "each constraint's own one-sided bound (an intersection–union test; the bounds are not simultaneous)")
    if not failed and not uncertified:
        return f"all {len(results)} constraints pass at {pct} confidence on {units} units by {how}"
    parts = []
    if failed:
        parts.append(f"{len(failed)} of {len(results)} constraints FAIL at {pct} confidence: " + ", ".join(failed))
    if uncertified:
        parts.append(f"{len(uncertified)} not certified (no declared support, so no valid bound): "
                     + ", ".join(uncertified))
    return "; ".join(parts) + f"; {units} units, {how}"


# --------------------------------------------------------------------------------------------------- audit
def audit(student: nn.Module, data: Mapping[str, Any] | Iterable[Mapping[str, Any]], spec: Spec,
          teachers: Mapping[str, Callable[..., Tensor]] | None = None, confidence: float = 0.95,
          step_log: str | None = None, *, weighting: nn.Module | Mapping[str, nn.Module] | None = None,
          pool: Callable[[Tensor, Tensor], Tensor] | None = None, distiller: Any | None = None,
          batch_size: int = 512, slice_keys: Sequence[str] = DEFAULT_SLICE_KEYS, min_slice: int = 5,
          seed: int | None = None, metrics: Mapping[str, float] | None = None, progress: bool = False,
          simultaneous: bool = False, slice_correction: str = "bonferroni", resamples: int = 2000,
          max_unit_count: float | None = None) -> AuditReport:
    """Audit ``student`` on ``data`` against every constraint of ``spec`` at one-sided ``confidence``.

    Args:
        student: maps ``batch["inputs"]`` to logits ``[..., V]`` (or a ``ModelOutput`` with ``.logits``).
        data: a dict of tensors with a leading example axis, or an iterable of such batches (a ``DataLoader``),
            streamed one batch at a time: ``inputs``, usually ``labels``; optional ``mask``, ``group_ids`` (the
            independent unit, ``[N]`` or per token), ``task_ids``, ``context``, cached ``teacher_logits``.
        spec: the :class:`~safekd.spec.Spec` whose constraints are audited.
        teachers: ``{name: callable}`` giving teacher logits, when the data has no ``teacher_logits``.
        confidence: one-sided confidence of every bound, in (0, 1).
        step_log: JSONL step log of the training run (training traces; the training record of teacher weights).
        weighting, pool, distiller: the training run's weighting operators / pool (or the distiller itself).
        batch_size: rows per batch for in-memory data.
        slice_keys: per-example integer keys to break student constraints down by (worst slices first).
        min_slice: slices with fewer units are listed as not bounded.
        seed: seeds the betting bound's unit order and the bootstrap (recorded in the report).
        simultaneous: bound each of the m student constraints at ``1 − α/m`` (Bonferroni), so that all bounds
            hold together; by default each bound holds on its own (the PASS verdict is then an
            intersection–union test, still at level α).
        slice_correction: ``"bonferroni"`` (slice bounds at ``1 − α/S`` over the S bounded slices) or ``"none"``
            (per-slice bounds, labelled so).
        resamples: bootstrap resamples for constraints without a declared support (shown, never certifying).
        max_unit_count: the most counted items one unit can hold (e.g. the context length), declared up front;
            ratio bounds scale units by it (default: the largest unit's count in the data).

    Returns:
        An :class:`~safekd.auditing.report.AuditReport`; ``report.passed`` iff every constraint passes.
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a safekd Spec (see safekd.load_spec), got {type(spec).__name__}")
    check_level(confidence)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(min_slice) != min_slice or min_slice < 1:
        raise ValueError(f"min_slice must be an integer >= 1, got {min_slice!r}")
    if slice_correction not in ("bonferroni", "none"):
        raise ValueError(f"slice_correction must be 'bonferroni' or 'none', got {slice_correction!r}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    if max_unit_count is not None and not (isinstance(max_unit_count, (int, float)) and math.isfinite(max_unit_count)
                                           and max_unit_count > 0):
        raise ValueError(f"max_unit_count must be a positive number, got {max_unit_count!r}")
    seed_used = 0 if seed is None else int(seed)
    device = next((p.device for p in student.parameters()), torch.device("cpu"))
    batches = iter_batches(data, batch_size, device=device)
    first = next(batches, None)
    if first is None:
        raise ValueError("the audit data is empty: nothing to audit")
    batches = itertools.chain([first], batches)
    have_teachers = teachers is not None or distiller is not None or any(k in first for k in _TEACHER_KEYS)
    weight_cons = spec.teacher_weight_constraints
    needs = [c.name for c in weight_cons] + [c.name for c in spec.student_constraints if isinstance(c, C.KLTo)]
    if needs and not have_teachers:
        raise ValueError(f"constraints {needs} need teacher outputs: pass teachers={{name: model}} or put "
                         "'teacher_logits' [N, K, V] in the audit data")
    view = _distiller(spec, student, teachers, weighting, pool, distiller) if have_teachers else None
    K = len(spec.teacher_names)
    grouped = "group_ids" in first

    units = {c.name: _Units() for c in spec.student_constraints}
    labels: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in slice_keys}
    worst = {c.name: -math.inf for c in weight_cons}
    violating = {c.name: 0 for c in weight_cons}
    w_sum: dict[str, Tensor] = {}
    w_slice: dict[str, dict[Any, list[Any]]] = {k: {} for k in slice_keys}
    active: dict[str, int] = {}
    examples = tokens = relaxed = corrected = 0
    correct = total = 0.0
    nb = 0
    was_training = student.training
    student.eval()
    try:
        from tqdm.auto import tqdm

        for i, batch in enumerate(tqdm(batches, desc="audit", unit="batch", disable=not progress, leave=False)):
            nb += 1
            _check_finite(batch, i)
            if view is None and any(k in batch for k in _TEACHER_KEYS) != have_teachers:
                raise ValueError("'teacher_logits' must be in every audit batch or in none")
            with torch.no_grad():
                logits = logits_of(student(batch["inputs"]), "the student")
            if not all_finite(logits):
                raise ValueError("the student returned non-finite logits (NaN/inf) on the audit data")
            B, tshape = logits.shape[0], logits.shape[:-1]
            keys, tok_groups = _unit_keys(batch, B, tshape, examples, grouped)
            out = view.targets(batch, logits, expand=False) if view is not None else None
            kw = {"teacher_logprobs": None if out is None else out.teacher_logp, "teacher_names": spec.teacher_names,
                  "unsafe": spec.unsafe, "target_logp": None if out is None else out.target_logp}
            for c in spec.student_constraints:
                if tok_groups is None:
                    v, cnt = per_example_sums(c, logits, batch, **kw)
                    units[c.name].add(keys, v, cnt)  # type: ignore[arg-type]
                else:
                    g, v, cnt = per_group_sums(c, logits, batch, tok_groups, **kw)
                    units[c.name].add(g.cpu().numpy().astype(np.int64), v, cnt)
            ex_labels = {}
            for k in slice_keys:
                lab = batch.get(k)
                if isinstance(lab, Tensor) and lab.shape == (B,) and not lab.is_floating_point():
                    ex_labels[k] = lab.detach().cpu().numpy()
                    ukeys = keys if tok_groups is None else tok_groups.reshape(B, -1).cpu().numpy()
                    ulab = ex_labels[k] if tok_groups is None else np.broadcast_to(ex_labels[k][:, None], ukeys.shape)
                    labels[k].append((np.asarray(ukeys).reshape(-1), np.asarray(ulab).reshape(-1)))
            mask = batch.get("mask")
            m = default_mask(batch, tshape, logits.device) if mask is None else mask
            if "labels" in batch:
                ok = m & (batch["labels"] >= 0)
                correct += float(((logits.argmax(-1) == batch["labels"]) & ok).sum())
                total += float(ok.sum())
            examples += B
            if out is not None:
                for c in weight_cons:
                    r = _weight_residuals(c, out, spec, batch)
                    if r.numel():
                        worst[c.name] = max(worst[c.name], float(r.max()))
                        violating[c.name] += int((r > ROUND_OFF).sum())
                mf = out.mask.to(out.weights.dtype).unsqueeze(-1)
                for scale, w in {**out.per_scale, "composed": out.composed, "final": out.weights}.items():
                    wt = (w * mf).reshape(B, -1, K).sum(1) / mf.reshape(B, -1, 1).sum(1).clamp_min(1)  # [B, K]
                    w_sum[scale] = w_sum.get(scale, 0) + wt.double().sum(0).cpu()
                    if scale == "final":
                        for k, lab in ex_labels.items():
                            for val in np.unique(lab):
                                acc = w_slice[k].setdefault(val.item(), [0, 0])
                                sel = torch.as_tensor(lab == val, device=wt.device)
                                acc[0] = acc[0] + wt[sel].double().sum(0).cpu()
                                acc[1] += int(sel.sum())
                for name, cnt in out.projection["active"].items():
                    active[name] = active.get(name, 0) + int(cnt)
                tokens += int(out.mask.sum())
                relaxed += int(out.relaxed.sum())
                corrected += out.projection["corrected_tokens"]
    finally:
        student.train(was_training)

    m_stat = len(spec.student_constraints)
    each = 1.0 - (1.0 - confidence) / m_stat if simultaneous and m_stat > 1 else float(confidence)
    unit = "group (group_ids)" if grouped else "example"
    record = weight_record(step_log, list(spec.teacher_names)) if step_log is not None else None
    results: list[ConstraintResult] = []
    n_units = examples
    for c in spec.constraints:
        if isinstance(c, C.StudentConstraint):
            ukeys, v, n = units[c.name].sums()
            n_units = ukeys.size
            lab = {k: _unit_labels(p, ukeys) for k, p in labels.items() if len(p) == nb}
            results.append(_student_result(c, v, n, lab, each, min_slice, slice_correction, unit, seed_used,
                                           resamples, max_unit_count))
        else:
            results.append(_weight_result(c, worst[c.name], violating[c.name], tokens, confidence, record))

    tw = None
    if w_sum:
        by_slice = {}
        for k, cells in w_slice.items():
            if cells:
                vals = sorted(cells)
                by_slice[k] = {"values": [str(v) for v in vals],
                               "mean_weight": [(cells[v][0] / max(cells[v][1], 1)).tolist() for v in vals]}
        tw = TeacherWeightSummary(
            teachers=list(spec.teacher_names),
            mean_weight={s: (w / max(examples, 1)).tolist() for s, w in w_sum.items()}, by_slice=by_slice,
            active_fraction={k: v / max(tokens, 1) for k, v in sorted(active.items())},
            relaxed_tokens=relaxed, corrected_tokens=corrected, total_tokens=tokens)

    all_metrics: dict[str, float | int] = {"accuracy": correct / total if total else float("nan"),
                                           "examples": int(examples)}
    if grouped:
        all_metrics["units"] = int(n_units)
    all_metrics.update({k: v if isinstance(v, int) else float(v) for k, v in (metrics or {}).items()})
    traces = read_traces(step_log, list(spec.teacher_names)) if step_log is not None else None
    return AuditReport(passed=all(r.status == PASS for r in results),
                       message=_message(results, float(confidence), n_units, simultaneous, m_stat),
                       confidence=float(confidence), constraints=results, metrics=all_metrics,
                       provenance=provenance(spec.to_dict(), student, examples, seed), teacher_weights=tw,
                       traces=traces, simultaneous=bool(simultaneous), slice_correction=slice_correction)
