"""Declarative safety constraints: values with a ``name``, ``sense`` ("<=" / ">="), ``threshold`` and ``tolerance``.

Sign convention (stated once): every constraint is read as g ≤ 0 with the signed residual
g = value − threshold for ``<=`` and g = threshold − value for ``>=`` (negative = slack).

Two families:

* **Teacher-weight constraints** restrict the teacher weights w ∈ Δ_K and compile to a ``solvers.FeasibleSet``:
  :func:`cap`, :func:`floor`, :func:`group_cap`, :func:`safety_order` (static, shared by all tokens) and
  :func:`exclude`, :func:`unsafe_mass` (per token: a halfspace a_t·w ≤ b_t at each position t).
* **Student constraints** are handled by a Lagrangian: :func:`unsafe_rate`, :func:`kl_to`, :func:`retain`,
  :func:`metric`. Each measures itself on a batch as sums and counts (:class:`~safekd.measurement.MeasurementSums`)
  through :meth:`StudentConstraint.measure_batch` — the same code the audit uses on held-out data.

Callables (``where`` predicates, metric functions) are referenced by name in spec files; see :mod:`safekd.spec`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from safekd.common.batches import default_mask
from safekd.common.measurement import MeasurementSums
from safekd.spec.unsafe import UnsafeSet

__all__ = [
    "Constraint", "TeacherWeightConstraint", "StudentConstraint",
    "Cap", "Floor", "GroupCap", "Exclude", "UnsafeMass", "SafetyOrder",
    "UnsafeRate", "KLTo", "Retain", "Metric", "TokenPredicate", "MeasureContext", "Support",
    "cap", "floor", "group_cap", "exclude", "unsafe_mass", "safety_order",
    "unsafe_rate", "kl_to", "retain", "metric",
]

Sense = Literal["<=", ">="]
Batch = Mapping[str, Any]
MetricFn = Callable[[Tensor, Batch], "Tensor | tuple[Tensor, Tensor]"]


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


# ---------------------------------------------------------------------------------------------------------------
# per-token predicates (exclude `where`, kl_to `on`)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenPredicate:
    """Selects positions of a batch: ``task_ids ∈ task_ids``, ``labels ∈ labels``, or ``fn(batch) -> Bool[...]``.

    In a spec file: ``{task_ids: [..]}``, ``{labels: [..]}`` or ``{fn: name}`` (a registered callable).
    """

    task_ids: tuple[int, ...] | None = None
    labels: tuple[int, ...] | None = None
    fn: Callable[[Batch], Tensor] | None = None
    fn_name: str | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.task_ids, self.labels, self.fn)]
        if sum(given) != 1:
            raise ValueError("TokenPredicate: give exactly one of `task_ids`, `labels` or `fn`")
        if self.fn is not None and self.fn_name is None:
            object.__setattr__(self, "fn_name", _fn_name(self.fn))

    @classmethod
    def coerce(cls, value: "TokenPredicate | Callable[[Batch], Tensor] | Mapping[str, Any] | int") -> "TokenPredicate":
        if isinstance(value, TokenPredicate):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(task_ids=(value,))
        if callable(value):
            return cls(fn=value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"task_ids", "labels"}
            if unknown or len(value) != 1:
                raise ValueError(f"TokenPredicate: expected one key of 'task_ids' or 'labels', got {sorted(value)}")
            key, ids = next(iter(value.items()))
            ids = (ids,) if isinstance(ids, int) else tuple(int(i) for i in ids)
            return cls(**{key: ids})
        raise TypeError(f"TokenPredicate: cannot build a predicate from {type(value).__name__}")

    def __call__(self, batch: Batch, shape: torch.Size, device: torch.device) -> Tensor:
        """Bool mask of the token shape ``shape``."""
        if self.fn is not None:
            m = torch.as_tensor(self.fn(batch), device=device)
            if m.dtype != torch.bool:
                raise ValueError(f"predicate {self.fn_name!r} must return a bool tensor, got {m.dtype}")
            return m.expand(shape)
        key = "task_ids" if self.task_ids is not None else "labels"
        ids = self.task_ids if self.task_ids is not None else self.labels
        src = batch.get(key)
        if src is None:
            raise ValueError(f"predicate on {key!r}: the batch has no {key!r} entry")
        src = torch.as_tensor(src, device=device)
        hit = torch.isin(src, torch.tensor(ids, device=device, dtype=src.dtype))
        while hit.dim() < len(shape):  # task ids given per sequence [B] for tokens [B, T]
            hit = hit.unsqueeze(-1)
        return hit.expand(shape)

    def to_dict(self) -> dict[str, Any]:
        if self.fn is not None:
            return {"fn": self.fn_name}
        if self.task_ids is not None:
            return {"task_ids": list(self.task_ids)}
        return {"labels": list(self.labels or ())}


# ---------------------------------------------------------------------------------------------------------------
# base classes
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Constraint:
    """A declared constraint: g = value − threshold (``<=``) or threshold − value (``>=``), satisfied iff g ≤ tol."""

    name: str
    sense: Sense
    threshold: float
    tolerance: float = 0.0
    kind: ClassVar[str] = "constraint"
    family: ClassVar[str] = "constraint"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{type(self).__name__}: `name` must be a non-empty string, got {self.name!r}")
        if self.sense not in ("<=", ">="):
            raise ValueError(f"constraint {self.name!r}: `sense` must be '<=' or '>=', got {self.sense!r}"
                             + (" (strict inequalities are not supported)" if self.sense in ("<", ">") else ""))
        thr = float(self.threshold)
        if not math.isfinite(thr):
            raise ValueError(f"constraint {self.name!r}: `threshold` must be finite, got {self.threshold!r}")
        object.__setattr__(self, "threshold", thr)
        tol = float(self.tolerance)
        if not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"constraint {self.name!r}: `tolerance` must be finite and >= 0, got {self.tolerance!r}")
        object.__setattr__(self, "tolerance", tol)

    def residual(self, value: Tensor | float) -> Tensor | float:
        """Signed residual g (negative = slack): value − threshold for ``<=``, threshold − value for ``>=``."""
        return value - self.threshold if self.sense == "<=" else self.threshold - value

    def satisfied(self, value: Tensor | float) -> bool:
        """g ≤ tolerance."""
        return bool(self.residual(value) <= self.tolerance)

    def teachers_used(self) -> tuple[str, ...]:
        """The teacher names this constraint refers to (checked against the spec's teachers)."""
        return ()

    def __bool__(self) -> bool:
        raise TypeError(f"the truth value of constraint {self.name!r} is ambiguous; use .satisfied(value)")

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-safe dict (``kind`` plus the constructor arguments); inverse of ``safekd.spec`` parsing."""
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        out.update(self._args())
        if self.tolerance:
            out["tolerance"] = self.tolerance
        return out

    def _args(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class TeacherWeightConstraint(Constraint):
    """Restricts the teacher weights w ∈ Δ_K; static ones act through ``apply_static``, per-token ones return a
    halfspace ``(a [N, K], b [N])`` per projected token from ``token_rows``."""

    family: ClassVar[str] = "teacher_weight"
    per_token: ClassVar[bool] = False

    def apply_static(self, fset: Any, index: Mapping[str, int], safety: Tensor | None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is a per-token constraint")

    def token_rows(self, ctx: "MeasureContext", sel: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is a static constraint")


Support = Literal["binary"] | tuple[float, float]


def _check_support(name: str, support: Any) -> "Support | None":
    """``None``, ``"binary"`` (each counted item is 0 or 1) or a finite interval ``(lo, hi)`` with ``lo < hi``."""
    if support is None or support == "binary":
        return support
    if isinstance(support, (str, bytes)) or not isinstance(support, Sequence) or len(support) != 2:
        raise ValueError(f"constraint {name!r}: `support` must be 'binary' or (lo, hi), got {support!r}")
    try:
        lo, hi = (float(x) for x in support)
    except (TypeError, ValueError):
        raise ValueError(f"constraint {name!r}: `support` must be two numbers (lo, hi), got {support!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"constraint {name!r}: `support` must be finite with lo < hi, got {support!r}")
    return (lo, hi)


@dataclass(frozen=True, kw_only=True)
class StudentConstraint(Constraint):
    """A constraint on the student, enforced by a multiplier: measured on a batch as sums and counts.

    ``support`` declares the range of one counted item's value (``"binary"`` or ``(lo, hi)``): the audit can only
    certify a bound for a declared support (built-in rates know theirs). ``margin ≥ 0`` makes training aim at
    ``train_threshold = threshold ∓ margin`` (the residual uses it) while the audit judges ``threshold``.
    """

    support: "Support | None" = None
    margin: float = 0.0
    family: ClassVar[str] = "student"
    default_support: ClassVar["Support | None"] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "support", _check_support(self.name, self.support))
        m = float(self.margin)
        if not (math.isfinite(m) and m >= 0):
            raise ValueError(f"constraint {self.name!r}: `margin` must be finite and >= 0, got {self.margin!r}")
        object.__setattr__(self, "margin", m)

    @property
    def train_threshold(self) -> float:
        """The level training aims at: ``threshold − margin`` (``<=``) or ``threshold + margin`` (``>=``)."""
        return self.threshold - self.margin if self.sense == "<=" else self.threshold + self.margin

    @property
    def value_support(self) -> "Support | None":
        """The declared support, else the built-in one (None: unbounded or unknown, so never certified)."""
        return self.support if self.support is not None else self.default_support

    def residual(self, value: Tensor | float) -> Tensor | float:
        """Signed residual against the training target: value − train_threshold (``<=``), or the reverse."""
        t = self.train_threshold
        return value - t if self.sense == "<=" else t - value

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.support is not None:
            out["support"] = self.support if isinstance(self.support, str) else list(self.support)
        if self.margin:
            out["margin"] = self.margin
        return out

    def measure(self, ctx: "MeasureContext") -> MeasurementSums:
        raise NotImplementedError

    def measure_batch(self, student_logits: Tensor, batch: Batch, *, teacher_logprobs: Tensor | None = None,
                      teacher_names: Sequence[str] | None = None, unsafe: UnsafeSet | None = None,
                      target_logp: Tensor | None = None) -> MeasurementSums:
        """Measure on one batch (for audits on held-out data): ``(proxy_sum, value_sum, count)``.

        ``student_logits [..., V]``; ``batch`` as in :class:`~safekd.distiller.SafeDistiller` (``mask`` optional);
        ``teacher_logprobs [..., K, V]`` and ``teacher_names`` for :func:`kl_to`; ``unsafe`` when the constraint has
        no unsafe set of its own; ``target_logp [..., V]`` for ``retain("target_agreement")``.
        """
        ctx = MeasureContext(student_logits=student_logits, batch=batch, teacher_logprobs=teacher_logprobs,
                             teacher_index={n: i for i, n in enumerate(teacher_names or ())}, unsafe=unsafe,
                             target_logp=target_logp)
        return self.measure(ctx)


@dataclass
class MeasureContext:
    """What a constraint may read at one batch. Token mask defaults to all-true; the mask and the log-softmax are
    computed once and cached."""

    student_logits: Tensor | None
    batch: Batch
    teacher_logprobs: Tensor | None = None
    teacher_index: Mapping[str, int] = field(default_factory=dict)
    unsafe: UnsafeSet | None = None
    target_logp: Tensor | None = None
    _student_logp: Tensor | None = None
    _mask: Tensor | None = None

    @property
    def token_shape(self) -> torch.Size:
        ref = self.student_logits if self.student_logits is not None else self.teacher_logprobs
        assert ref is not None
        return ref.shape[:-1] if self.student_logits is not None else ref.shape[:-2]

    @property
    def device(self) -> torch.device:
        ref = self.student_logits if self.student_logits is not None else self.teacher_logprobs
        assert ref is not None
        return ref.device

    @property
    def mask(self) -> Tensor:
        """``batch["mask"]`` (bool, of the token shape; when absent ``labels != -100``, else all-true), validated once.

        Raises:
            ValueError: the mask is not a bool tensor of the token shape.
        """
        if self._mask is None:
            m = self.batch.get("mask")
            if m is None:
                m = default_mask(self.batch, self.token_shape, self.device)
            else:
                m = torch.as_tensor(m, device=self.device)
                if m.dtype != torch.bool or m.shape != self.token_shape:
                    raise ValueError(f"batch['mask'] must be a bool tensor of shape {tuple(self.token_shape)}, "
                                     f"got {m.dtype} {tuple(m.shape)}")
            self._mask = m
        return self._mask

    @property
    def student_logp(self) -> Tensor:
        """``log_softmax(student_logits)``, computed once and shared by every constraint (and, in
        :class:`~safekd.distiller.SafeDistiller`, by the KD divergence, which sets it with its graph)."""
        if self._student_logp is None:
            if self.student_logits is None:
                raise ValueError("this constraint needs student logits")
            self._student_logp = F.log_softmax(self.student_logits, dim=-1)
        return self._student_logp

    @student_logp.setter
    def student_logp(self, value: Tensor) -> None:
        if self.student_logits is not None and value.shape != self.student_logits.shape:
            raise ValueError(f"student_logp {tuple(value.shape)} must have the shape of the student logits "
                             f"{tuple(self.student_logits.shape)}")
        self._student_logp = value

    def student_unsafe_mass(self, u: UnsafeSet) -> Tensor:
        """p_θ(U | t) ``[...]`` = Σ_{v∈U} exp(log p_θ(v | t)) (differentiable)."""
        return u.mass(self.student_logp, self.batch)

    def student_logp_at(self, ids: Tensor) -> Tensor:
        """log p_θ(ids | t) ``[...]`` at one id per token (``ids`` ≥ 0, of the token shape; differentiable)."""
        return self.student_logp.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)

    def student_argmax(self) -> Tensor:
        """argmax_v p_θ(v | t) ``[...]``."""
        return self.student_logp.argmax(-1)

    def unsafe_for(self, own: UnsafeSet | None, who: str) -> UnsafeSet:
        u = own if own is not None else self.unsafe
        if u is None:
            raise ValueError(f"constraint {who!r} needs an unsafe set: give `unsafe=` to the constraint or the spec")
        return u

    def teacher(self, name: str, who: str) -> int:
        if name not in self.teacher_index:
            raise ValueError(f"constraint {who!r} names teacher {name!r}; known teachers: {sorted(self.teacher_index)}")
        return self.teacher_index[name]


def _masked_sums(per_token: Tensor, value: Tensor, mask: Tensor) -> MeasurementSums:
    """Σ over masked tokens of the differentiable ``per_token`` and the detached ``value``, and the count."""
    m = mask.to(per_token.dtype)
    return MeasurementSums(proxy_sum=(per_token * m).sum(), value_sum=(value.detach().to(per_token.dtype) * m).sum(),
                           count=m.sum())


# ---------------------------------------------------------------------------------------------------------------
# teacher-weight constraints
# ---------------------------------------------------------------------------------------------------------------
def _check_prob(name: str, arg: str, x: float, what: str = "a teacher weight") -> None:
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"constraint {name!r}: `{arg}` must be in [0, 1] ({what}), got {x}")


@dataclass(frozen=True, kw_only=True)
class Cap(TeacherWeightConstraint):
    """w_teacher ≤ max."""

    teacher: str
    kind: ClassVar[str] = "cap"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_prob(self.name, "max", self.threshold)

    def teachers_used(self) -> tuple[str, ...]:
        return (self.teacher,)

    def apply_static(self, fset: Any, index: Mapping[str, int], safety: Tensor | None) -> Any:
        return fset.cap(index[self.teacher], self.threshold, name=self.name)

    def _args(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "max": self.threshold}


@dataclass(frozen=True, kw_only=True)
class Floor(TeacherWeightConstraint):
    """w_teacher ≥ min."""

    teacher: str
    kind: ClassVar[str] = "floor"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_prob(self.name, "min", self.threshold)

    def teachers_used(self) -> tuple[str, ...]:
        return (self.teacher,)

    def apply_static(self, fset: Any, index: Mapping[str, int], safety: Tensor | None) -> Any:
        return fset.floor(index[self.teacher], self.threshold, name=self.name)

    def _args(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "min": self.threshold}


@dataclass(frozen=True, kw_only=True)
class GroupCap(TeacherWeightConstraint):
    """Σ_{k ∈ teachers} w_k ≤ max."""

    teachers: tuple[str, ...]
    kind: ClassVar[str] = "group_cap"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_prob(self.name, "max", self.threshold)
        object.__setattr__(self, "teachers", tuple(self.teachers))
        if len(self.teachers) < 1 or len(set(self.teachers)) != len(self.teachers):
            raise ValueError(f"constraint {self.name!r}: `teachers` must be non-empty and distinct, got {self.teachers}")

    def teachers_used(self) -> tuple[str, ...]:
        return self.teachers

    def apply_static(self, fset: Any, index: Mapping[str, int], safety: Tensor | None) -> Any:
        return fset.group_cap([index[t] for t in self.teachers], self.threshold, name=self.name, hard=True)

    def _args(self) -> dict[str, Any]:
        return {"teachers": list(self.teachers), "max": self.threshold}


@dataclass(frozen=True, kw_only=True)
class SafetyOrder(TeacherWeightConstraint):
    """A safer teacher never weighs less: σ_i > σ_j ⇒ w_j − w_i ≤ 0 (consecutive pairs; ties give no row).

    ``scores`` (teacher → σ, higher = safer) default to the spec's teacher ``safety`` settings.
    """

    scores: Mapping[str, float] | None = None
    kind: ClassVar[str] = "safety_order"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scores is not None:
            object.__setattr__(self, "scores", {str(k): float(v) for k, v in self.scores.items()})

    def teachers_used(self) -> tuple[str, ...]:
        return tuple(self.scores) if self.scores is not None else ()

    def apply_static(self, fset: Any, index: Mapping[str, int], safety: Tensor | None) -> Any:
        if self.scores is not None:
            missing = set(index) - set(self.scores)
            if missing:
                raise ValueError(f"constraint {self.name!r}: `scores` lacks teachers {sorted(missing)}")
            safety = torch.tensor([self.scores[n] for n in sorted(index, key=index.__getitem__)], dtype=torch.float64)
        if safety is None:
            raise ValueError(f"constraint {self.name!r}: needs teacher safety scores; set `safety:` on every teacher "
                             "in the spec or pass `scores=` to safety_order()")
        return fset.order_by(safety.to(dtype=fset.lower.dtype, device=fset.lower.device), name=self.name, hard=True)

    def _args(self) -> dict[str, Any]:
        return {} if self.scores is None else {"scores": dict(self.scores)}


@dataclass(frozen=True, kw_only=True)
class Exclude(TeacherWeightConstraint):
    """w_teacher = 0 on the positions selected by ``where`` (row w_teacher ≤ 0 there, ≤ 1 elsewhere)."""

    teacher: str
    where: TokenPredicate
    kind: ClassVar[str] = "exclude"
    per_token: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "where", TokenPredicate.coerce(self.where))

    def teachers_used(self) -> tuple[str, ...]:
        return (self.teacher,)

    def token_rows(self, ctx: "MeasureContext", sel: Tensor) -> tuple[Tensor, Tensor]:
        lp = ctx.teacher_logprobs
        assert lp is not None
        hit = self.where(ctx.batch, ctx.token_shape, ctx.device)[sel]
        a = torch.zeros(hit.shape[0], lp.shape[-2], dtype=lp.dtype, device=lp.device)
        a[:, ctx.teacher(self.teacher, self.name)] = 1.0
        return a, (~hit).to(lp.dtype)

    def _args(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "where": self.where.to_dict()}


@dataclass(frozen=True, kw_only=True)
class UnsafeMass(TeacherWeightConstraint):
    """Per token t: the pooled target's unsafe mass Σ_k w_k p_k(U | t) ≤ max (exact for the linear pool)."""

    unsafe: UnsafeSet | None = None
    kind: ClassVar[str] = "unsafe_mass"
    per_token: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_prob(self.name, "max", self.threshold)
        if self.unsafe is not None:
            object.__setattr__(self, "unsafe", UnsafeSet.coerce(self.unsafe))

    def token_rows(self, ctx: "MeasureContext", sel: Tensor) -> tuple[Tensor, Tensor]:
        lp = ctx.teacher_logprobs
        assert lp is not None
        a = ctx.unsafe_for(self.unsafe, self.name).mass(lp, ctx.batch, teacher_axis=True)[sel]
        return a, torch.full(a.shape[:-1], self.threshold, dtype=lp.dtype, device=lp.device)

    def _args(self) -> dict[str, Any]:
        return {"max": self.threshold, **({} if self.unsafe is None else {"unsafe": self.unsafe.to_dict()})}


# ---------------------------------------------------------------------------------------------------------------
# student constraints
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class UnsafeRate(StudentConstraint):
    """Expected student unsafe probability E_t[p_θ(U | t)] ≤ max (value and proxy are the same, differentiable);
    p_θ(U | t) = exp(logsumexp_{v∈U} log p_θ(v | t)) from the shared student log-probabilities."""

    unsafe: UnsafeSet | None = None
    kind: ClassVar[str] = "unsafe_rate"
    default_support: ClassVar[Support | None] = (0.0, 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_prob(self.name, "max", self.threshold, "a rate: the expected student probability of the unsafe set")
        if self.unsafe is not None:
            object.__setattr__(self, "unsafe", UnsafeSet.coerce(self.unsafe))

    def measure(self, ctx: MeasureContext) -> MeasurementSums:
        p_u = ctx.student_unsafe_mass(ctx.unsafe_for(self.unsafe, self.name))
        return _masked_sums(p_u, p_u, ctx.mask)

    def _args(self) -> dict[str, Any]:
        return {"max": self.threshold, **({} if self.unsafe is None else {"unsafe": self.unsafe.to_dict()})}


@dataclass(frozen=True, kw_only=True)
class KLTo(StudentConstraint):
    """E_t[KL(p_teacher ‖ p_θ)] ≤ max over the positions selected by ``on`` (all unmasked ones by default)."""

    teacher: str
    on: TokenPredicate | None = None
    kind: ClassVar[str] = "kl_to"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold < 0:
            raise ValueError(f"constraint {self.name!r}: `max` must be >= 0 (a KL divergence), got {self.threshold}")
        if self.on is not None:
            object.__setattr__(self, "on", TokenPredicate.coerce(self.on))

    def teachers_used(self) -> tuple[str, ...]:
        return (self.teacher,)

    def measure(self, ctx: MeasureContext) -> MeasurementSums:
        if ctx.teacher_logprobs is None:
            raise ValueError(f"constraint {self.name!r} needs teacher log-probabilities")
        lp_t = ctx.teacher_logprobs[..., ctx.teacher(self.teacher, self.name), :]
        kl = (lp_t.exp() * (lp_t - ctx.student_logp)).sum(-1)
        mask = ctx.mask if self.on is None else ctx.mask & self.on(ctx.batch, ctx.token_shape, ctx.device)
        return _masked_sums(kl, kl, mask)

    def _args(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "max": self.threshold,
                **({} if self.on is None else {"on": self.on.to_dict()})}


def _fn_sums(out: "Tensor | tuple[Tensor, Tensor]", who: str, like: Tensor) -> tuple[Tensor, Tensor]:
    """A user function's output as (sum, count): a scalar mean counts as one unit."""
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(f"constraint {who!r}: the function must return a scalar or (sum, count)")
        s, c = out
        return torch.as_tensor(s, dtype=like.dtype, device=like.device), \
            torch.as_tensor(c, dtype=like.dtype, device=like.device)
    s = torch.as_tensor(out, dtype=like.dtype, device=like.device)
    if s.dim() != 0:
        raise ValueError(f"constraint {who!r}: the function must return a scalar or (sum, count), got shape "
                         f"{tuple(s.shape)}")
    return s, torch.ones((), dtype=like.dtype, device=like.device)


@dataclass(frozen=True, kw_only=True)
class Metric(StudentConstraint):
    """A user measurement: ``fn(student_logits, batch)`` (true value; drives λ) and a differentiable ``proxy`` with
    the same signature (drives the gradient; defaults to ``fn``). Each returns a scalar or ``(sum, count)``."""

    fn: MetricFn
    proxy: MetricFn | None = None
    fn_name: str | None = None
    proxy_name: str | None = None
    kind: ClassVar[str] = "metric"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.fn):
            raise TypeError(f"constraint {self.name!r}: `fn` must be callable, got {type(self.fn).__name__}")
        if self.proxy is not None and not callable(self.proxy):
            raise TypeError(f"constraint {self.name!r}: `proxy` must be callable, got {type(self.proxy).__name__}")
        if self.fn_name is None:
            object.__setattr__(self, "fn_name", _fn_name(self.fn))
        if self.proxy is not None and self.proxy_name is None:
            object.__setattr__(self, "proxy_name", _fn_name(self.proxy))

    @property
    def value_support(self) -> Support | None:
        """Declared ``support``, else the function's own ``fn.support`` attribute (how a named function in a spec
        file declares it), else None."""
        return self.support if self.support is not None else _check_support(self.name, getattr(self.fn, "support",
                                                                                                  None))

    def measure(self, ctx: MeasureContext) -> MeasurementSums:
        logits = ctx.student_logits
        assert logits is not None
        if self.proxy is None:
            p_sum, count = _fn_sums(self.fn(logits, ctx.batch), self.name, logits)
            v_sum = p_sum.detach()
        else:
            with torch.no_grad():
                v_sum, count = _fn_sums(self.fn(logits, ctx.batch), self.name, logits)
            p_sum, p_count = _fn_sums(self.proxy(logits, ctx.batch), self.name, logits)
            p_sum = p_sum * (count / p_count.clamp_min(1e-30))  # proxy rate on the value's count
        return MeasurementSums(proxy_sum=p_sum, value_sum=v_sum, count=count)

    def _args(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fn": self.fn_name, "sense": self.sense, "threshold": self.threshold}
        if self.proxy is not None:
            out["proxy"] = self.proxy_name
        return out


_RETAIN_BUILTINS = ("accuracy", "target_agreement")


@dataclass(frozen=True, kw_only=True)
class Retain(StudentConstraint):
    """Capability retention ≥ min. Built-ins: ``"accuracy"`` (value 1[argmax p_θ = label], proxy p_θ(label)) and
    ``"target_agreement"`` (the same against argmax of the pooled target); or a callable as in :func:`metric`."""

    metric: str | MetricFn
    proxy: MetricFn | None = None
    metric_name: str | None = None
    proxy_name: str | None = None
    kind: ClassVar[str] = "retain"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.metric, str):
            if self.metric not in _RETAIN_BUILTINS:
                raise ValueError(f"constraint {self.name!r}: unknown retain metric {self.metric!r}; built-ins are "
                                 f"{list(_RETAIN_BUILTINS)} (or pass a callable)")
            object.__setattr__(self, "metric_name", self.metric)
        elif callable(self.metric):
            if self.metric_name is None:
                object.__setattr__(self, "metric_name", _fn_name(self.metric))
        else:
            raise TypeError(f"constraint {self.name!r}: `metric` must be a name or a callable")
        if self.proxy is not None and self.proxy_name is None:
            object.__setattr__(self, "proxy_name", _fn_name(self.proxy))

    @property
    def value_support(self) -> Support | None:
        """Built-ins are 0/1 per token; a callable declares ``support`` (or carries a ``support`` attribute)."""
        if self.support is not None:
            return self.support
        if isinstance(self.metric, str):
            return "binary"
        return _check_support(self.name, getattr(self.metric, "support", None))

    def measure(self, ctx: MeasureContext) -> MeasurementSums:
        if callable(self.metric):
            return Metric(name=self.name, sense=">=", threshold=self.threshold, fn=self.metric,
                          proxy=self.proxy).measure(ctx)
        ref = self.reference(ctx)
        mask = ctx.mask & (ref >= 0)  # ignore_index-style negative labels are not counted
        proxy = ctx.student_logp_at(ref.clamp_min(0).long()).exp()
        value = (ctx.student_argmax() == ref).to(proxy.dtype)
        return _masked_sums(proxy, value, mask)

    def reference(self, ctx: MeasureContext) -> Tensor:
        """The built-in metrics' reference token per position ``[...]``: the label (``accuracy``; −100 where not
        counted) or argmax_v q_t(v) of the pooled target (``target_agreement``)."""
        if self.metric == "accuracy":
            ref = ctx.batch.get("labels")
            if ref is None:
                raise ValueError(f"constraint {self.name!r} (retain accuracy) needs batch['labels']")
            return torch.as_tensor(ref, device=ctx.device)
        if ctx.target_logp is None:
            raise ValueError(f"constraint {self.name!r} (retain target_agreement) needs the pooled target")
        return ctx.target_logp.argmax(-1)

    def _args(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric_name, "min": self.threshold}
        if self.proxy is not None:
            out["proxy"] = self.proxy_name
        return out


# ---------------------------------------------------------------------------------------------------------------
# constructors (the public, cvxpy-like surface)
# ---------------------------------------------------------------------------------------------------------------
def cap(teacher: str, max: float, *, name: str | None = None, tolerance: float = 0.0) -> Cap:
    """w_teacher ≤ max."""
    return Cap(name=name or f"cap({teacher})", sense="<=", threshold=max, tolerance=tolerance, teacher=teacher)


def floor(teacher: str, min: float, *, name: str | None = None, tolerance: float = 0.0) -> Floor:
    """w_teacher ≥ min."""
    return Floor(name=name or f"floor({teacher})", sense=">=", threshold=min, tolerance=tolerance, teacher=teacher)


def group_cap(teachers: Sequence[str], max: float, *, name: str | None = None, tolerance: float = 0.0) -> GroupCap:
    """Σ_{k∈teachers} w_k ≤ max."""
    return GroupCap(name=name or f"group_cap({','.join(teachers)})", sense="<=", threshold=max, tolerance=tolerance,
                    teachers=tuple(teachers))


def exclude(teacher: str, where: "TokenPredicate | Callable[[Batch], Tensor] | Mapping[str, Any] | int", *,
            name: str | None = None, tolerance: float = 0.0) -> Exclude:
    """w_teacher = 0 at positions where ``where`` holds (``fn(batch) -> Bool[...]``, ``{task_ids: [...]}``, ...)."""
    return Exclude(name=name or f"exclude({teacher})", sense="<=", threshold=0.0, tolerance=tolerance,
                   teacher=teacher, where=TokenPredicate.coerce(where))


def unsafe_mass(max: float, *, unsafe: "UnsafeSet | Sequence[int] | Callable[..., Tensor] | None" = None,
                name: str | None = None, tolerance: float = 0.0) -> UnsafeMass:
    """Per token: Σ_k w_k p_k(U) ≤ max."""
    return UnsafeMass(name=name or "unsafe_mass", sense="<=", threshold=max, tolerance=tolerance,
                      unsafe=None if unsafe is None else UnsafeSet.coerce(unsafe))


def safety_order(scores: Mapping[str, float] | None = None, *, name: str | None = None,
                 tolerance: float = 0.0) -> SafetyOrder:
    """Per token: a safer teacher never weighs less (scores default to the spec's teacher ``safety``)."""
    return SafetyOrder(name=name or "safety_order", sense="<=", threshold=0.0, tolerance=tolerance, scores=scores)


def unsafe_rate(max: float, *, unsafe: "UnsafeSet | Sequence[int] | Callable[..., Tensor] | None" = None,
                name: str | None = None, tolerance: float = 0.0, margin: float = 0.0) -> UnsafeRate:
    """E_t[p_θ(U | t)] ≤ max (expected student probability of the unsafe set; support [0, 1]); training aims at
    ``max − margin``."""
    return UnsafeRate(name=name or "unsafe_rate", sense="<=", threshold=max, tolerance=tolerance, margin=margin,
                      unsafe=None if unsafe is None else UnsafeSet.coerce(unsafe))


def kl_to(teacher: str, max: float, *, on: "TokenPredicate | Callable[[Batch], Tensor] | Mapping[str, Any] | int | None" = None,
          name: str | None = None, tolerance: float = 0.0, support: Support | None = None,
          margin: float = 0.0) -> KLTo:
    """E_t[KL(p_teacher ‖ p_θ)] ≤ max on the positions selected by ``on`` (a task id, predicate, ...). A KL is
    unbounded: the audit certifies it only under a declared ``support=(lo, hi)`` per token."""
    return KLTo(name=name or f"kl_to({teacher})", sense="<=", threshold=max, tolerance=tolerance, teacher=teacher,
                on=None if on is None else TokenPredicate.coerce(on), support=support, margin=margin)


def retain(metric: str | MetricFn, min: float, *, proxy: MetricFn | None = None, name: str | None = None,
           tolerance: float = 0.0, support: Support | None = None, margin: float = 0.0) -> Retain:
    """Capability retention: metric ≥ min (``"accuracy"``, ``"target_agreement"`` — 0/1 per token — or a callable,
    which declares its ``support``); training aims at ``min + margin``."""
    label = metric if isinstance(metric, str) else _fn_name(metric)
    return Retain(name=name or f"retain({label})", sense=">=", threshold=min, tolerance=tolerance, metric=metric,
                  proxy=proxy, support=support, margin=margin)


def metric(fn: MetricFn, sense: Sense, threshold: float, *, proxy: MetricFn | None = None, name: str | None = None,
           tolerance: float = 0.0, support: Support | None = None, margin: float = 0.0) -> Metric:
    """A user measurement ``fn(student_logits, batch) {<=, >=} threshold``; ``proxy`` drives the gradient.

    ``support`` (``"binary"`` or ``(lo, hi)``, one counted item's range; or a ``fn.support`` attribute) is what lets
    the audit certify it; ``margin`` moves the training target inside the threshold.
    """
    return Metric(name=name or f"metric({_fn_name(fn)})", sense=sense, threshold=threshold, tolerance=tolerance, fn=fn,
                  proxy=proxy, support=support, margin=margin)


# ---------------------------------------------------------------------------------------------------------------
# convex teacher-weight constraints (projected by solvers.convex; not polyhedral)
# ---------------------------------------------------------------------------------------------------------------
STABILITY_SCALES = ("task", "context", "step")


@dataclass(frozen=True, kw_only=True)
class ConvexWeightConstraint(TeacherWeightConstraint):
    """A convex constraint on every token's teacher weights w ∈ Δ_K, declared in cvxpy (row-wise over tokens) and
    projected by :func:`solvers.convex.project_convex` after the polyhedral constraints. Subclasses give
    ``cvxpy(w, p)`` (``w`` the ``(n, K)`` variable, ``p`` their parameters), the torch twin ``value(w, p) -> [n]``
    (the measured quantity, compared with ``threshold`` by ``sense``) and ``token_params`` (values per token)."""

    convex: ClassVar[bool] = True
    smooth: ClassVar[bool] = True  #: value is differentiable at the solutions (polish, stationarity check, gradient)

    def apply_static(self, fset: Any, index: Mapping[str, int], safety: Tensor | None) -> Any:
        return fset  # not polyhedral: enforced by the convex projection

    def cvxpy(self, w: Any, p: Mapping[str, Any]) -> list:
        raise NotImplementedError

    def value(self, w: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def token_params(self, ctx: MeasureContext, n: int, K: int, sel: Tensor, state: Mapping[Any, Tensor] | None,
                     device: torch.device) -> dict[str, Tensor]:
        """Parameter values ``{name: [n, ...]}`` (float64 on ``device``) for the ``n`` tokens ``sel`` of the batch."""
        raise NotImplementedError


def _entropy(w: Tensor) -> Tensor:
    return -(w * w.clamp_min(torch.finfo(w.dtype).tiny).log()).sum(-1)


@dataclass(frozen=True, kw_only=True)
class MinEntropy(ConvexWeightConstraint):
    """Diversity floor: H(w) = −Σ_k w_k log w_k ≥ min (nats) on every token; log K is the largest entropy."""

    kind: ClassVar[str] = "min_entropy"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold < 0:
            raise ValueError(f"constraint {self.name!r}: `min` must be >= 0 (an entropy in nats), got {self.threshold}")

    def cvxpy(self, w: Any, p: Mapping[str, Any]) -> list:
        import cvxpy as cp

        return [cp.sum(cp.entr(w), axis=1) >= p["h"]]

    def value(self, w: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        return _entropy(w)

    def token_params(self, ctx: MeasureContext, n: int, K: int, sel: Tensor, state: Mapping[Any, Tensor] | None,
                     device: torch.device) -> dict[str, Tensor]:
        return {"h": torch.full((n,), self.threshold, dtype=torch.float64, device=device)}

    def _args(self) -> dict[str, Any]:
        return {"min": self.threshold}


@dataclass(frozen=True, kw_only=True)
class KLBall(ConvexWeightConstraint):
    """Trust region: KL(w ‖ w_ref) = Σ_k w_k log(w_k / ref_k) ≤ max on every token (``reference``: teacher →
    weight, summing to 1, every weight > 0)."""

    reference: Mapping[str, float]
    kind: ClassVar[str] = "kl_ball"

    def __post_init__(self) -> None:
        super().__post_init__()
        ref = {str(k): float(v) for k, v in dict(self.reference).items()}
        if not ref or any(not (v > 0 and math.isfinite(v)) for v in ref.values()):
            raise ValueError(f"constraint {self.name!r}: `reference` weights must be finite and > 0, got {ref}")
        if abs(sum(ref.values()) - 1) > 1e-6:
            raise ValueError(f"constraint {self.name!r}: `reference` weights must sum to 1, got "
                             f"{sum(ref.values()):.6g}")
        if self.threshold < 0:
            raise ValueError(f"constraint {self.name!r}: `max` must be >= 0 (a KL divergence), got {self.threshold}")
        object.__setattr__(self, "reference", ref)

    def teachers_used(self) -> tuple[str, ...]:
        return tuple(self.reference)

    def cvxpy(self, w: Any, p: Mapping[str, Any]) -> list:
        import cvxpy as cp

        return [-cp.sum(cp.entr(w), axis=1) - cp.sum(cp.multiply(p["log_ref"], w), axis=1) <= p["r"]]

    def value(self, w: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        return (w * (w.clamp_min(torch.finfo(w.dtype).tiny).log() - p["log_ref"])).sum(-1)

    def token_params(self, ctx: MeasureContext, n: int, K: int, sel: Tensor, state: Mapping[Any, Tensor] | None,
                     device: torch.device) -> dict[str, Tensor]:
        names = sorted(ctx.teacher_index, key=ctx.teacher_index.__getitem__)
        missing = [t for t in names if t not in self.reference]
        if missing:
            raise ValueError(f"constraint {self.name!r}: `reference` lacks teachers {missing}")
        ref = torch.tensor([self.reference[t] for t in names], dtype=torch.float64, device=device)
        return {"log_ref": ref.log().expand(n, K), "r": torch.full((n,), self.threshold, dtype=torch.float64,
                                                                   device=device)}

    def _args(self) -> dict[str, Any]:
        return {"reference": dict(self.reference), "max": self.threshold}


@dataclass(frozen=True, kw_only=True)
class Stability(ConvexWeightConstraint):
    """Temporal stability: ‖w_t − m_{t−1}(τ)‖₁ ≤ max on every token of key τ, where m_{t−1}(τ) is the mean
    weight of τ's tokens at the previous step that had them (``scale="task"``: τ = the token's task id; ``"context"``:
    the integer domain id in ``context [..., 1]``, as ``Routing(key="context")`` reads it; ``"step"``: one key for
    all tokens). The per-key mean then moves by at most ``max`` between steps (convexity of the norm).
    Keys without a previous mean are unconstrained. The distiller keeps m in its state and checkpoint."""

    scale: str = "task"
    kind: ClassVar[str] = "stability"
    smooth: ClassVar[bool] = False  # the ℓ1 norm has kinks where w_k = m_k

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale not in STABILITY_SCALES:
            raise ValueError(f"constraint {self.name!r}: `scale` must be one of {list(STABILITY_SCALES)}, "
                             f"got {self.scale!r}")
        if not 0 <= self.threshold <= 2:
            raise ValueError(f"constraint {self.name!r}: `max` must be in [0, 2] (an ℓ1 distance on the simplex), "
                             f"got {self.threshold}")

    def keys(self, batch: Batch, shape: torch.Size, device: torch.device) -> Tensor:
        """The key of every token ``[*shape]`` (ids given per sequence are broadcast over its tokens).

        Raises:
            ValueError: the batch lacks ``task_ids`` / ``context``, or ``context`` is not ``[..., 1]`` integer ids.
        """
        if self.scale == "step":
            return torch.zeros(shape, dtype=torch.long, device=device)
        field_ = "task_ids" if self.scale == "task" else "context"
        if batch.get(field_) is None:
            raise ValueError(f"constraint {self.name!r} (scale={self.scale!r}) needs batch[{field_!r}]; use "
                             "scale='step' for one key per step")
        ids = torch.as_tensor(batch[field_], device=device)
        if self.scale == "context":
            if ids.shape[-1] != 1 or not bool((ids == ids.round()).all()):
                raise ValueError(f"constraint {self.name!r} (scale='context') needs batch['context'] of shape [..., 1]"
                                 f" holding integer domain ids, got {tuple(ids.shape)}")
            ids = ids[..., 0]
        ids = ids.long()
        while ids.dim() < len(shape):
            ids = ids.unsqueeze(-1)
        return ids.expand(shape)

    def cvxpy(self, w: Any, p: Mapping[str, Any]) -> list:
        import cvxpy as cp

        return [cp.norm(w - p["previous"], 1, axis=1) <= p["delta"]]

    def value(self, w: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        return (w - p["previous"]).abs().sum(-1)

    def token_params(self, ctx: MeasureContext, n: int, K: int, sel: Tensor, state: Mapping[Any, Tensor] | None,
                     device: torch.device) -> dict[str, Tensor]:
        keys = self.keys(ctx.batch, ctx.token_shape, ctx.device)[sel].reshape(n).to(device)
        prev = torch.full((n, K), 1.0 / K, dtype=torch.float64, device=device)
        delta = torch.full((n,), 2.0, dtype=torch.float64, device=device)  # no previous mean: no constraint
        for key, m in (state or {}).items():
            hit = keys == int(key)
            prev[hit] = m.to(prev)
            delta[hit] = self.threshold
        return {"previous": prev, "delta": delta}

    def _args(self) -> dict[str, Any]:
        return {"max": self.threshold, "scale": self.scale}


@dataclass(frozen=True, kw_only=True)
class Convex(ConvexWeightConstraint):
    """A user constraint ``fn(w, p) -> [cvxpy constraints]`` (``w`` the ``(n, K)`` variable, row-wise: each
    constraint of shape ``(n,)``; ``p`` the ``params`` as ``cp.Parameter``s ``(n, *s)``), with an optional torch
    twin ``values(w, p) -> g [n, c]`` (signed residuals, ≤ 0 holds; ``lhs − rhs`` of an affine equality; one column
    per constraint of ``fn`` in order;
    needed for the polish, the stationarity check and the gradient, else measured through cvxpy). Measured as
    max_j g_j ≤ 0; ``smooth=False`` for constraints with kinks (an ℓ1 norm): ``values`` then only measure. In spec
    files ``fn`` and ``values`` are registered names and ``params`` lists of numbers (shared by every token)."""

    fn: Callable[..., list]
    values: Callable[[Tensor, Mapping[str, Tensor]], Tensor] | None = None
    params: Mapping[str, Tensor] = field(default_factory=dict)
    smooth: bool = True  # type: ignore[misc]  # an instance setting here (a class constant on the named ones)
    fn_name: str | None = None
    values_name: str | None = None
    kind: ClassVar[str] = "convex"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.fn):
            raise TypeError(f"constraint {self.name!r}: `fn` must be callable (w, params) -> list of cvxpy "
                            f"constraints, got {type(self.fn).__name__}")
        if self.values is not None and not callable(self.values):
            raise TypeError(f"constraint {self.name!r}: `values` must be callable, got {type(self.values).__name__}")
        params = {}
        for k, v in dict(self.params).items():
            t = torch.as_tensor(v, dtype=torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"constraint {self.name!r}: params[{k!r}] contains NaN or inf")
            params[str(k)] = t
        object.__setattr__(self, "params", params)
        if self.fn_name is None:
            object.__setattr__(self, "fn_name", _fn_name(self.fn))
        if self.values is not None and self.values_name is None:
            object.__setattr__(self, "values_name", _fn_name(self.values))

    def cvxpy(self, w: Any, p: Mapping[str, Any]) -> list:
        return list(self.fn(w, p))

    def value(self, w: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        if self.values is not None:
            from solvers.convex import inequality_mask

            g = self.values(w, p)  # an equality's column is its signed residual: |g| is its violation
            return torch.where(inequality_mask(self.fn, w.shape[-1], p).to(g.device), g, g.abs()).amax(-1)
        from solvers.convex import constraint_residuals

        return constraint_residuals(self.fn, w, p).amax(-1)

    def token_params(self, ctx: MeasureContext, n: int, K: int, sel: Tensor, state: Mapping[Any, Tensor] | None,
                     device: torch.device) -> dict[str, Tensor]:
        return {k: v.to(device).expand(n, *v.shape) for k, v in self.params.items()}

    def _args(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fn": self.fn_name}
        if self.values is not None:
            out["values"] = self.values_name
        if self.params:
            out["params"] = {k: v.tolist() for k, v in self.params.items()}
        if not self.smooth:
            out["smooth"] = False
        return out


class ConvexBundle:
    """The convex constraints of a spec as ONE ``extra``/``values`` pair for :func:`solvers.convex.project_convex`
    (parameters prefixed ``c{j}.``); built once per distiller so that the compiled problems are reused."""

    def __init__(self, constraints: Sequence[ConvexWeightConstraint]) -> None:
        self.constraints = tuple(constraints)

    @staticmethod
    def _sub(p: Mapping[str, Any], j: int) -> dict[str, Any]:
        pre = f"c{j}."
        return {k[len(pre):]: v for k, v in p.items() if k.startswith(pre)}

    def extra(self, w: Any, p: Mapping[str, Any]) -> list:
        return [con for j, c in enumerate(self.constraints) for con in c.cvxpy(w, self._sub(p, j))]

    def values(self, w: Tensor, p: Mapping[str, Tensor]) -> Tensor:
        """Signed residuals ``[n, c]`` (g ≤ 0 holds), one column per cvxpy constraint."""
        cols = []
        for j, c in enumerate(self.constraints):
            sub = self._sub(p, j)
            if isinstance(c, Convex):
                if c.values is None:
                    raise ValueError(f"constraint {c.name!r} has no torch `values`")
                cols.append(c.values(w, sub))
            else:
                cols.append(c.residual(c.value(w, sub))[:, None])
        return torch.cat(cols, dim=-1)

    @property
    def has_values(self) -> bool:
        """Every constraint has a torch twin (else the bundle certifies through cvxpy)."""
        return all(not isinstance(c, Convex) or c.values is not None for c in self.constraints)

    @property
    def smooth(self) -> bool:
        return all(c.smooth for c in self.constraints)

    def params(self, ctx: MeasureContext, n: int, K: int, sel: Tensor, state: Mapping[str, Mapping[Any, Tensor]],
               device: torch.device) -> dict[str, Tensor]:
        return {f"c{j}.{k}": v for j, c in enumerate(self.constraints)
                for k, v in c.token_params(ctx, n, K, sel, state.get(c.name), device).items()}

    def residuals(self, w: Tensor, p: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per constraint name: the signed residual per token ``[n]`` (its measured value against its threshold)."""
        return {c.name: c.residual(c.value(w, self._sub(p, j))) for j, c in enumerate(self.constraints)}


def min_entropy(min: float, *, name: str | None = None, tolerance: float = 0.0) -> MinEntropy:
    """Diversity floor: every token's teacher weights have entropy H(w) ≥ min (nats; at most log K)."""
    return MinEntropy(name=name or "min_entropy", sense=">=", threshold=min, tolerance=tolerance)


def kl_ball(reference: Mapping[str, float], max: float, *, name: str | None = None,
            tolerance: float = 0.0) -> KLBall:
    """Trust region: KL(w ‖ reference) ≤ max on every token (``reference``: teacher → weight, summing to 1)."""
    return KLBall(name=name or "kl_ball", sense="<=", threshold=max, tolerance=tolerance, reference=reference)


def stability(max: float, scale: str = "task", *, name: str | None = None, tolerance: float = 0.0) -> Stability:
    """Temporal stability: ‖w_t − w_{t−1}‖₁ ≤ max between consecutive steps, per task (``scale="task"``),
    per context domain id (``"context"``) or for the whole step (``"step"``); see :class:`Stability`."""
    return Stability(name=name or f"stability({scale})", sense="<=", threshold=max, tolerance=tolerance, scale=scale)


def convex(fn: Callable[..., list], *, name: str,
           values: Callable[[Tensor, Mapping[str, Tensor]], Tensor] | None = None,
           params: Mapping[str, Tensor] | None = None, smooth: bool = True, tolerance: float = 0.0) -> Convex:
    """Any convex constraint written in cvxpy, row-wise over tokens; see :class:`Convex`."""
    return Convex(name=name, sense="<=", threshold=0.0, tolerance=tolerance, fn=fn, values=values,
                  params=dict(params or {}), smooth=bool(smooth))


__all__ += ["ConvexWeightConstraint", "MinEntropy", "KLBall", "Stability", "Convex", "ConvexBundle",
            "min_entropy", "kl_ball", "stability", "convex"]
