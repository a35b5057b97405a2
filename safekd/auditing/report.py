"""The audit report: plain dataclasses, a versioned JSON form and its schema.

The JSON form is validated by ``schema_v2.json`` (JSON Schema draft 2020-12). Every float in the JSON is
finite or ``null`` (NaN and ±inf become ``null``) so that strict JSON parsers accept the file.

A constraint's ``status`` is ``"pass"``, ``"fail"`` or ``"not certified"`` (no declared support: no valid bound,
so it cannot pass); the verdict compares the bound with the threshold alone (the training ``tolerance`` and
``margin`` are shown, never added).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "SliceResult",
    "ConstraintResult",
    "TeacherWeightSummary",
    "AuditReport",
    "load_schema",
    "validate_report_dict",
    "save_json",
    "format_confidence",
    "PASS", "FAIL", "NOT_CERTIFIED", "NOT_BOUNDED",
]

SCHEMA_VERSION = "2.0"
PASS, FAIL, NOT_CERTIFIED, NOT_BOUNDED = "pass", "fail", "not certified", "not bounded (n < min_slice)"


def format_confidence(c: float) -> str:
    """``0.95`` → ``"95%"``, ``0.999`` → ``"99.9%"``: as many digits as needed, never rounded up to 100%."""
    for digits in range(2, 16):
        text = f"{100.0 * c:.{digits}g}"
        if float(text) < 100.0 or c >= 1.0:
            return text + "%"
    return f"{100.0 * c!r}%"


@dataclass(frozen=True)
class SliceResult:
    """One constraint evaluated on one slice (``key == value``) of the audit data."""

    key: str
    value: str
    n: int
    estimate: float
    bound: float
    slack: float
    passed: bool
    count: float | None = None
    status: str = ""
    confidence: float | None = None

    def __post_init__(self) -> None:
        _settle_status(self)


@dataclass(frozen=True)
class ConstraintResult:
    """One constraint on the audit data.

    ``slack`` is signed in the safe direction against the threshold alone: ``threshold − bound`` for ``≤`` and
    ``bound − threshold`` for ``≥``; a certified constraint passes iff ``slack ≥ 0``. ``estimand``, ``unit``,
    ``support``, ``seed`` and ``resamples`` say what was bounded and how; ``tolerance`` and ``train_threshold`` are
    the training settings, shown only. ``slices`` are sorted worst (smallest slack) first, unbounded ones last.
    """

    name: str
    kind: str
    measure: str
    direction: str
    threshold: float
    estimate: float
    bound: float
    bound_method: str
    confidence: float
    slack: float
    passed: bool
    n: int
    count: float | None = None
    description: str = ""
    slices: list[SliceResult] = field(default_factory=list)
    status: str = ""
    tolerance: float = 0.0
    train_threshold: float | None = None
    estimand: str = ""
    unit: str = ""
    support: str = ""
    seed: int | None = None
    resamples: int | None = None
    numerical_tolerance: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        _settle_status(self)


def _settle_status(r: "SliceResult | ConstraintResult") -> None:
    """``status`` defaults to pass/fail from ``passed``; a given status must agree with ``passed``."""
    if not r.status:
        object.__setattr__(r, "status", PASS if r.passed else FAIL)
    elif r.passed != (r.status == PASS):
        raise ValueError(f"{type(r).__name__}: passed={r.passed} contradicts status {r.status!r}")


@dataclass(frozen=True)
class TeacherWeightSummary:
    """What the teacher weights looked like on the audit data.

    ``mean_weight[scale][k]`` is teacher ``k``'s mean weight at that scale (``"final"`` = after projection);
    ``by_slice[key]`` is ``{"values": [...], "mean_weight": [[K] per slice value]}``; ``active_fraction[name]`` is how
    often each teacher-weight constraint was active; token counts say how many rows the projection relaxed / moved.
    """

    teachers: list[str]
    mean_weight: dict[str, list[float]]
    by_slice: dict[str, dict[str, Any]]
    active_fraction: dict[str, float]
    relaxed_tokens: int
    corrected_tokens: int
    total_tokens: int


@dataclass
class AuditReport:
    """The result of :func:`safekd.audit`: every constraint with its bound, slices, weights, traces, provenance."""

    passed: bool
    message: str
    confidence: float
    constraints: list[ConstraintResult]
    metrics: dict[str, float | int]
    provenance: dict[str, Any]
    teacher_weights: TeacherWeightSummary | None = None
    traces: dict[str, Any] | None = None
    simultaneous: bool = False
    slice_correction: str = "bonferroni"
    schema_version: str = SCHEMA_VERSION

    @property
    def failed(self) -> list[ConstraintResult]:
        return [c for c in self.constraints if not c.passed]

    def constraint(self, name: str) -> ConstraintResult:
        for c in self.constraints:
            if c.name == name:
                return c
        raise KeyError(f"no constraint named {name!r}; have {[c.name for c in self.constraints]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats → ``None``), matching ``schema_v2.json``."""
        d = {
            "schema_version": self.schema_version,
            "passed": self.passed,
            "message": self.message,
            "confidence": self.confidence,
            "simultaneous": self.simultaneous,
            "slice_correction": self.slice_correction,
            "constraints": [asdict(c) for c in self.constraints],
            "metrics": dict(self.metrics),
            "teacher_weights": asdict(self.teacher_weights) if self.teacher_weights is not None else None,
            "traces": self.traces,
            "provenance": self.provenance,
        }
        return _finite(d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AuditReport":
        """Inverse of :meth:`to_dict` (``None`` floats come back as NaN); validate first if the source is untrusted."""
        nan = float("nan")

        def f(x: Any) -> float:
            return nan if x is None else float(x)

        constraints = []
        for c in d["constraints"]:
            slices = [SliceResult(**{**s, "estimate": f(s["estimate"]), "bound": f(s["bound"]), "slack": f(s["slack"])})
                      for s in c["slices"]]
            fields = {k: v for k, v in c.items() if k != "slices"}
            for k in ("estimate", "bound", "slack", "threshold"):
                fields[k] = f(fields[k])
            if fields.get("train_threshold") is not None:
                fields["train_threshold"] = f(fields["train_threshold"])
            constraints.append(ConstraintResult(**fields, slices=slices))
        tw = d.get("teacher_weights")
        return cls(
            passed=d["passed"],
            message=d["message"],
            confidence=d["confidence"],
            constraints=constraints,
            metrics={k: v if isinstance(v, int) else f(v) for k, v in d["metrics"].items()},
            provenance=d["provenance"],
            teacher_weights=TeacherWeightSummary(**tw) if tw is not None else None,
            traces=d.get("traces"),
            simultaneous=d["simultaneous"],
            slice_correction=d["slice_correction"],
            schema_version=d["schema_version"],
        )

    def summary_table(self) -> str:
        """Fixed-width text table, one row per constraint (the CLI prints it)."""
        head = f"{'constraint':<28} {'estimate':>9} {'bound':>9} {'thresh':>8} {'slack':>9}  result"
        rows = [head, "-" * len(head)]
        for c in self.constraints:
            rows.append(f"{c.name:<28} {c.estimate:>9.4f} {c.bound:>9.4f} {c.direction}{c.threshold:>7.4f} "
                        f"{c.slack:>+9.4f}  {c.status.upper()}")
        return "\n".join(rows)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def load_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), shipped as ``safekd/auditing/schema_v2.json``."""
    return json.loads(resources.files("safekd.auditing").joinpath("schema_v2.json").read_text(encoding="utf-8"))


def validate_report_dict(d: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``d`` matches the v2 schema."""
    import jsonschema

    jsonschema.Draft202012Validator(load_schema()).validate(d)


def save_json(report: AuditReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(report.to_json(), encoding="utf-8")
    return path
