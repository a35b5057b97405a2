"""Result values of projections and diagnoses: closed status vocabulary, frozen dataclasses.

Like scipy's ``OptimizeResult`` the repr shows ``success``, ``status`` and ``message`` first; unlike it,
every field is always present.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, fields

from torch import Tensor

__all__ = ["Status", "ProjectionResult", "DiagnosisResult", "projection_message", "projection_success"]


class Status(enum.IntEnum):
    """Closed per-row status vocabulary (values stored in ``LongTensor`` fields)."""

    OPTIMAL = 0  #: KKT residual within tolerance
    RELAXED = 1  #: the row's set was empty; solved on the least-relaxed set (see ``relaxation``)
    MAX_ITER = 2  #: iteration limit hit; a feasible fallback (cvxpy reference) was used for the row
    INFEASIBLE = 3  #: the set is empty (diagnosis only)
    NUMERICAL = 4  #: numerical trouble; result could not be verified


def _short(value: object) -> str:
    if isinstance(value, Tensor):
        if value.numel() <= 6:
            return f"tensor({value.tolist()})"
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return repr(value)


def rows_by_status(status: Tensor) -> dict[str, int]:
    """``{status name: row count}`` of the statuses present in ``status`` (a host read)."""
    return {s.name: int((status == int(s)).sum()) for s in Status if bool((status == int(s)).any())}


def projection_success(status: Tensor) -> bool:
    """Whether every row of :func:`solvers.project` is ``OPTIMAL`` or ``RELAXED`` (a host read)."""
    return bool((status <= int(Status.RELAXED)).all())


def projection_message(status: Tensor) -> str:
    """The message of :func:`solvers.project` for the per-row ``status``: success and the rows by status."""
    return ("projection " + ("succeeded" if projection_success(status) else "has unverified rows")
            + f"; rows by status: {rows_by_status(status) or {'OPTIMAL': 0}}")


class _FromStatus:
    """A field that may be given as ``None`` (inside a compiled graph, where reading it would synchronise) and is
    then computed from ``status`` when read, after the graph: ``success`` = every row ``OPTIMAL``/``RELAXED``,
    ``message`` = :func:`projection_message`. The dataclasses' descriptor-typed field: no default (``__get__``
    on the class raises ``AttributeError``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj: object, owner: type | None = None) -> object:
        if obj is None:
            raise AttributeError(self.name)
        value = obj.__dict__[self.slot]
        if value is None:
            status = obj.status  # type: ignore[attr-defined]
            value = projection_success(status) if self.name == "success" else projection_message(status)
        return value

    def __set__(self, obj: object, value: object) -> None:
        obj.__dict__[self.slot] = value


class _ReprMixin:
    def __repr__(self) -> str:
        body = ",\n  ".join(f"{f.name}={_short(getattr(self, f.name))}" for f in fields(self))  # type: ignore[arg-type]
        return f"{type(self).__name__}(\n  {body})"


@dataclass(frozen=True, repr=False, eq=False)
class ProjectionResult(_ReprMixin):
    """Per-row outcome of :func:`solvers.project` (all tensors share the batch shape ``[...]`` of ``v``).

    ``kkt_residual`` = max(|Σw−1|, bound violation, max_r |min(μ_r, b_r − a_r·w)|, relative stationarity
    error ‖P_box∩Δ(v − Aᵀμ) − w‖∞ / max(1, ‖v‖∞, ‖Aᵀμ‖∞)) on the (relaxed) set.
    ``success`` and ``message`` built inside a ``torch.compile`` graph are computed from ``status`` when read.
    """

    success: bool = _FromStatus()  # type: ignore[assignment]  # None when built in a compiled graph: from status
    status: Tensor  #: LongTensor[...] of Status values
    message: str = _FromStatus()  # type: ignore[assignment]
    kkt_residual: Tensor  #: [...]
    active: Tensor  #: BoolTensor[..., m]  rows with positive multiplier
    active_lower: Tensor  #: BoolTensor[..., K]
    active_upper: Tensor  #: BoolTensor[..., K]
    iterations: Tensor  #: LongTensor[...]  steps on the multipliers (active set; fixed-shape: path and Newton)
    relaxation: Tensor  #: [...]  uniform relaxation t ≥ 0 of the soft rows (and box) bounds; 0 unless RELAXED
    multipliers: Tensor  #: [..., m]  row multipliers μ ≥ 0


@dataclass(frozen=True, repr=False, eq=False)
class DiagnosisResult(_ReprMixin):
    """Outcome of :func:`solvers.diagnose`.

    For a batched set the first empty batch element (``index``) is diagnosed; ``feasible`` holds every element.
    ``conflict`` is an irreducible subset of named constraints that cannot hold together (empty when feasible).
    ``interior_point`` maximises the Slater margin ``slack`` (``slack > 0``: strictly interior point exists).
    """

    success: bool
    status: Status
    message: str
    conflict: tuple[str, ...]
    index: tuple[int, ...] | None
    feasible: Tensor  #: BoolTensor[batch_shape]
    interior_point: Tensor | None  #: [K] for the first batch element (or None when empty)
    slack: float | None  #: Slater margin s* of the first batch element
    raw_status: int | None  #: HiGHS/linprog status of the last LP solved


