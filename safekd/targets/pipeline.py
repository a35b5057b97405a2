"""The target pipeline of :class:`~safekd.distiller.SafeDistiller`: what each student token is distilled to.

For a batch (tokens t, K teachers, V classes):

1. teacher logits (cached in the batch, a sparse top-k cache, or teacher forwards under ``no_grad``) →
   log p_k = log_softmax(z_k / T_k);
2. per-scale weights (weighting operators, stop-gradient) composed by normalised product w̄_t;
3. projection w_t = Π_{W_t}(w̄_t) onto each unmasked token's feasible set W_t (static caps/floors/groups/order plus
   per-token ``unsafe_mass`` / ``exclude`` rows; tokens whose W_t is empty are solved on the least-relaxed set),
   then onto W_t ∩ {convex constraints} where one is violated (stability keeps its previous means here);
4. pooled target q_t = G(p_1..p_K; w_t), corrected on relaxed tokens so that q_t(U) ≤ ε.

:class:`TargetPipeline` runs it (``teacher_logits(batch)``, ``pipeline(batch, student_logits, teacher_logits)``
→ :class:`Targets`), re-checks the projection against the cvxpy reference and keeps the stability state
(``state_dict``/``load_state_dict``).
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import solvers
from solvers.errors import holds
from safekd.spec import constraints as C
from safekd.spec.unsafe import cap_unsafe_mass
from safekd.common.batches import IGNORE_INDEX
from safekd.common.distributed import get_world_size
from safekd.targets.signals import Signals, all_finite
from safekd.targets.sparse import SparseTeachers, distiller_targets, token_rows
from safekd.spec.document import Spec
from safekd.targets.teachers import teacher_outputs
from safekd.targets.weighting.compose import SCALES, compose

__all__ = ["TargetPipeline", "Targets", "NonFiniteError", "ProjectionCheckError", "require_finite", "weight_report"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]
TeacherFn = Callable[[Any], Tensor]


class NonFiniteError(FloatingPointError):
    """NaN/inf in teacher logits, student logits, the loss or the gradients; raised before any state changes."""


class ProjectionCheckError(solvers.SolverError):
    """The batched projection disagrees with the cvxpy reference beyond tolerance."""


@dataclass(frozen=True, eq=False)
class Targets:
    """What :meth:`SafeDistiller.targets <safekd.distiller.SafeDistiller.targets>` computed for one batch (tokens
    ``[...]``, K teachers, V classes).

    ``per_scale[scale]``, ``composed`` (normalised product w̄) and ``weights`` (projected, w = Π_W(w̄)) are
    ``[..., K]``; ``feasible_set`` holds the unmasked tokens' sets W_t ``[N, K]`` in the projection dtype (None
    without teacher-weight constraints or unmasked tokens; unbatched when every token shares the static set);
    ``relaxed``/``corrected`` are ``[...]`` bool (empty W_t solved on the least-relaxed set / target corrected);
    computed in a ``torch.compile`` graph, ``feasible_set`` holds every token's set, ``relaxed`` includes the tokens
    the projection could not certify there, and ``projection`` holds 0-d tensors (:func:`projection_stats`);
    ``target_logp`` is the pooled, corrected target log q ``[..., V]``; ``projection`` the stats of
    :attr:`StepRecord.projection <safekd.distiller.StepRecord.projection>`; ``context`` the constraint
    :class:`~safekd.constraints.MeasureContext`.
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


def require_finite(what: str, t: Tensor, detail: Callable[[Tensor], str] | None = None) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and ``detail(t)``) if ``t`` holds NaN or inf."""
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
    if not holds(~bad.any(), f"batch['labels'] must be in [0, V={V}) or {IGNORE_INDEX}"):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"batch['labels'] holds {int(labels[at])} at index {at}: labels must be in [0, V={V}) "
                         f"(the student's output size) or {IGNORE_INDEX} for a position that does not count")


def _broadcast_tokens(w: Tensor, token_shape: torch.Size) -> Tensor:
    """Per-scale weights ``[..., K]`` (e.g. per sequence ``[B, K]``) broadcast to ``[*token_shape, K]``."""
    while w.dim() - 1 < len(token_shape):
        w = w.unsqueeze(-2)
    return w.expand(*token_shape, w.shape[-1])


class TargetPipeline:
    """Teacher log-probabilities → per-scale weights → composition → projection → pool → correction, for one
    spec. ``teachers``, ``weighting`` and ``pool`` as for :class:`~safekd.distiller.SafeDistiller`; ``step_count``
    returns the number of finished steps (log messages and the reference sample's seed use step_count + 1).

    Raises:
        solvers.InfeasibleError: the static teacher-weight constraints (caps, floors, groups, order) are empty.
    """

    def __init__(self, spec: Spec, teachers: Mapping[str, TeacherFn] | None,
                 weighting: nn.Module | Mapping[str, nn.Module] | None,
                 pool: Callable[[Tensor, Tensor], Tensor] | None, step_count: Callable[[], int]) -> None:
        self.spec, self._step_count = spec, step_count
        self.teacher_names = spec.teacher_names
        self.teacher_index = spec.teacher_index
        self.K = len(self.teacher_names)
        self.teachers = self._check_teachers(teachers)
        self.weighting = self._check_weighting(weighting)
        self._builtin_pool = _default_pool()  # returns a fresh tensor: relaxed tokens are corrected in place
        self.pool = pool if pool is not None else self._builtin_pool
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
        self.recheck_reference = False  # the reference solver failed: re-check on the next step

    @property
    def step_count(self) -> int:
        """Steps finished so far (the targets being computed belong to step ``step_count + 1``)."""
        return self._step_count()

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

    def teacher_logits(self, batch: Batch) -> Tensor | SparseTeachers:
        """The batch's teacher logits ``[..., K, V]`` (cached, or teacher forwards under ``no_grad``), or its sparse
        top-k cache; checked for shape and NaN/inf (:class:`NonFiniteError`)."""
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
        require_finite("teacher logits", t, which)
        return t.detach()

    def __call__(self, batch: Batch, student_logits: Tensor, teacher_logits: Tensor | SparseTeachers,
                 expand: bool = True) -> Targets:
        """The :class:`Targets` of ``batch`` from the student logits and the teacher logits already read (so that
        training runs the teachers before the student); ``expand=False`` keeps the sparse bucket view."""
        if isinstance(teacher_logits, SparseTeachers):
            return distiller_targets(self, batch, teacher_logits, student_logits, expand)
        if not isinstance(student_logits, Tensor):
            raise TypeError(f"the student must return a logits tensor, got {type(student_logits).__name__}")
        require_finite("student logits", student_logits.detach())
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

    def _weights(self, batch: Batch, teacher_logits: Tensor | None, teacher_logp: Tensor, student_logits: Tensor | None,
                 mask: Tensor, sampled_logprobs: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        token_shape = mask.shape
        if not self.weighting:
            w = teacher_logp.new_full((*token_shape, self.K), 1.0 / self.K)
            return {}, w
        signals = Signals(teacher_logits=teacher_logits, teacher_logprobs=teacher_logp, labels=batch.get("labels"),
                          sampled_logprobs=sampled_logprobs,
                          task_ids=batch.get("task_ids"), context=batch.get("context"),
                          safety=self.spec.safety_scores(dtype=teacher_logp.dtype, device=teacher_logp.device),
                          student_logits=None if student_logits is None else student_logits.detach(), mask=mask)
        per_scale = {s: _broadcast_tokens(op(signals).to(teacher_logp.dtype), token_shape)
                     for s, op in self.weighting.items()}
        return per_scale, compose(**per_scale).weights

    def _token_set(self, ctx: C.MeasureContext, sel: Tensor | EllipsisType, dtype: torch.dtype) -> solvers.FeasibleSet:
        """The feasible sets of the selected tokens (``sel``: a mask, or ``...`` for every token): the static set
        plus per-token rows (batch shape ``[n]``)."""
        fs = self._static_set(dtype, ctx.device)
        if not self.token_constraints:
            return fs
        for c in self.token_constraints:
            a, b = token_rows(c, ctx, sel)
            fs = fs.halfspace(a.reshape(-1, self.K).to(dtype), b.reshape(-1).to(dtype), name=c.name)
        return fs

    def _project(self, composed: Tensor, ctx: C.MeasureContext, mask: Tensor
                 ) -> tuple[Tensor, solvers.FeasibleSet | None, Tensor, dict[str, Any]]:
        """w_t = Π_{W_t}(w̄_t) on the unmasked tokens; returns (weights [..., K], the unmasked tokens' sets
        [N, K] (None without teacher-weight constraints or tokens), relaxed mask [...], projection stats)."""
        stats: dict[str, Any] = {"tokens": 0, "projected_tokens": 0, "active": {}, "relaxed_tokens": 0,
                                 "uncertified_tokens": 0, "max_kkt_residual": 0.0}  # uncertified: in a graph only
        none_relaxed = torch.zeros_like(mask)
        if not (self.static_constraints or self.token_constraints):
            return composed, None, none_relaxed, stats
        if torch.compiler.is_compiling():
            return self._project_in_graph(composed, ctx, mask)
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
            ok = ~relaxed[todo]
            stats.update(active=projection_stats({"active": _active_counts(fs, info)})["active"], max_kkt_residual=float(info.kkt_residual[ok].max()) if bool(ok.any())
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

    def _project_in_graph(self, composed: Tensor, ctx: C.MeasureContext, mask: Tensor
                          ) -> tuple[Tensor, solvers.FeasibleSet, Tensor, dict[str, Any]]:
        """:meth:`_project` inside a ``torch.compile`` graph (fixed shapes, no host synchronisation): every token is
        projected (masked ones too; their weights stay ``w̄_t``), tokens inside their set keep ``w̄_t`` as in the
        eager path, and the tokens :func:`solvers.project` could not certify in the graph (``NUMERICAL``: no active
        set inside a graph) count as relaxed, so that their pooled target is corrected to ``q(U) ≤ ε`` like that of
        an empty set. The statistics are 0-d tensors (``active`` per name, zero counts included), converted by
        :func:`projection_stats` after the graph; the sets are every token's ``[N, K]``."""
        K, dtype = self.K, _projection_dtype(composed)
        v = composed.reshape(-1, K).to(dtype)
        keep = mask.reshape(-1)
        fs = self._token_set(ctx, ..., dtype)
        w, info = solvers.project(v, fs, return_info=True, on_all_empty="relax")
        w = w.clamp_min(0)
        inside = fs.contains(v, tol=0.0)
        w = torch.where(inside[:, None], v, w / w.sum(-1, keepdim=True))
        uncertified = keep & ~inside & (info.status == int(solvers.Status.NUMERICAL))
        relaxed = keep & ~inside & ((info.status == int(solvers.Status.RELAXED)) | (info.relaxation > 1e-12))
        relaxed = relaxed | uncertified
        todo = keep & ~inside
        ok = todo & ~relaxed
        stats = {"tokens": keep.sum(), "projected_tokens": todo.sum(), "active": _active_counts(fs, info, todo),
                 "relaxed_tokens": relaxed.sum(), "uncertified_tokens": uncertified.sum(),
                 "max_kkt_residual": torch.where(ok, info.kkt_residual, 0.0).amax()}
        w = torch.where(keep[:, None], w.to(composed.dtype), composed.reshape(-1, K))
        return w.reshape(composed.shape), fs, relaxed.reshape(mask.shape), stats

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

    def update_stability(self, t: Targets) -> dict[str, float]:
        """Keep each stability key's mean weight of this step over all ranks (the next step's m_{t−1}: sums and
        counts per key, SUM-reduced); returns the measured ℓ1 change of the means per constraint (max over keys
        seen at both steps; 0 if none)."""
        from safekd.common.distributed import all_reduce_sums, get_rank

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

    def _correct(self, target: Tensor, relaxed: Tensor, batch: Batch) -> tuple[Tensor, Tensor, int | Tensor]:
        """On relaxed tokens with q(U) > ε: q(v) ← q(v)·ε/q(U) on U and q(v)·(1−ε)/(1−q(U)) off U (uniform over the
        safe tokens when q(U) = 1). Returns the target, the corrected-token mask and its count (inside a
        ``torch.compile`` graph: a 0-d tensor, the correction computed on every row and kept on the relaxed ones)."""
        if self.unsafe_mass_constraints and torch.compiler.is_compiling():  # fixed shape: every row, where relaxed
            target, corrected = self._cap_unsafe(target, batch, relaxed)
            return target, corrected, corrected.sum()
        if not self.unsafe_mass_constraints or not bool(relaxed.any()):
            return target, torch.zeros_like(relaxed), 0
        rows = relaxed.nonzero(as_tuple=True)
        sub, done = self._cap_unsafe(target, batch, rows)  # [R, V]: only tokens whose teacher-weight set was empty
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

    def _cap_unsafe(self, target: Tensor, batch: Batch, rows: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """:func:`~safekd.unsafe.cap_unsafe_mass` for each ``unsafe_mass`` constraint in turn, on the target rows
        ``rows`` (an index tuple: those rows, ``[R, V]``) or on every row where ``rows`` (a bool mask) holds. Returns
        the corrected rows and which of them changed."""
        picked = isinstance(rows, tuple)
        logq, done = (target[rows] if picked else target), None
        for c in self.unsafe_mass_constraints:
            u = c.unsafe if c.unsafe is not None else self.spec.unsafe
            assert u is not None
            in_u = u.mask(target.shape[-1], batch, device=target.device)
            if picked and in_u.dim() > 1:  # a per-position mask: the picked rows' masks; a vocabulary mask broadcasts
                in_u = in_u.expand_as(target)[rows]
            logq, need = cap_unsafe_mass(logq, in_u, c.threshold, rows=None if picked else rows)
            done = need if done is None else done | need
        return logq, done

    def reference_due(self) -> bool:
        """Whether this step re-checks the projection (every ``checks.reference_every`` steps, or after a failure)."""
        every = self.spec.checks.reference_every
        return bool(every and (self.token_constraints or self.static_constraints)
                    and (self.recheck_reference or (self.step_count + 1) % every == 0))

    def reference_check(self, t: Targets) -> dict[str, Any]:
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
            self.recheck_reference = True
            logger.warning("step %d: the reference projection failed (%s); re-checking on the next step",
                           self.step_count + 1, exc)
            return {"rows": 0, "error": str(exc)}
        self.recheck_reference = False
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

    def state_dict(self) -> dict[str, Any]:
        """The reference re-check flag and the stability state (previous mean weights per constraint and key)."""
        return {"recheck_reference": self.recheck_reference,
                "convex_state": {n: {str(k): m.clone() for k, m in d.items()} for n, d in self.convex_state.items()}}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError unless ``state`` (a distiller state) fits this spec's stability constraints."""
        unknown = sorted(set(state["convex_state"]) - set(self.convex_state))
        if unknown:
            raise ValueError(f"checkpoint has stability state for {unknown}, which this spec lacks")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked by :meth:`check_state` first)."""
        self.recheck_reference = bool(state.get("recheck_reference", False))
        for n, d in state["convex_state"].items():
            self.convex_state[n] = {int(k): m.to(torch.float64) for k, m in d.items()}


def _active_counts(fs: solvers.FeasibleSet, info: solvers.ProjectionResult, rows: Tensor | None = None
                   ) -> dict[str, Tensor]:
    """Per constraint name: in how many projected rows (those of ``rows`` where given) it is active, through its
    row of ``fs`` or a bound it names (0-d tensors, zero counts included; :func:`projection_stats` reads them)."""
    counts: dict[str, Tensor] = {}
    for names, act in ((fs.row_names, info.active), (fs.lower_names, info.active_lower),
                       (fs.upper_names, info.active_upper)):
        per = (act if rows is None else act & rows[:, None]).sum(0)
        for i, name in enumerate(names):
            if name is not None:
                counts[name] = counts[name] + per[i] if name in counts else per[i]
    return counts


def projection_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    """``Targets.projection`` as Python numbers: the 0-d tensors of a compiled :class:`TargetPipeline` (read here,
    after the graph: one host synchronisation each) become ints (counts) or floats; ``active`` keeps the names
    with a nonzero count, as the eager path does. Eager statistics are returned as they are (a copy)."""
    def py(x: Any) -> Any:
        return (float(x) if x.is_floating_point() else int(x)) if isinstance(x, Tensor) else x
    out = {k: py(x) for k, x in stats.items()}
    if "active" in out:
        out["active"] = {k: py(n) for k, n in out["active"].items() if py(n)}
    return out


def weight_report(t: Targets, teacher_names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``{scale | "composed" | "projected": {teacher: mean weight over the unmasked tokens}}`` of ``t``."""
    per_scale, composed, projected, mask = t.per_scale, t.composed, t.weights, t.mask
    m = mask.to(composed.dtype).unsqueeze(-1)
    denom = m.sum().clamp_min(1)
    items = {**per_scale, "composed": composed, "projected": projected}
    means = torch.stack([(w * m).flatten(0, -2).sum(0) / denom for w in items.values()]).tolist()
    return {name: dict(zip(teacher_names, row)) for name, row in zip(items, means)}


def _projection_dtype(v: Tensor) -> torch.dtype:
    """Weights are projected in float64 (N×K is tiny next to the vocabulary work) except where the device lacks it."""
    return v.dtype if v.device.type == "mps" else torch.float64


def _default_pool() -> Callable[[Tensor, Tensor], Tensor]:
    """Linear pool without re-validation (the distiller has checked the teacher logits already)."""
    from safekd.targets.pooling import linear_pool

    return functools.partial(linear_pool, validate_args=False)

