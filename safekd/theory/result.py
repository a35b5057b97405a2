"""`TheoryResult`: what every theorem harness returns (measured quantity vs bound, pass/fail, plot)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure

SourceTag = Literal["paper claim", "reconstruction"]
SOURCE_TAGS: tuple[str, ...] = ("paper claim", "reconstruction")


def jsonable(value: Any) -> Any:
    """Convert tensors, numpy values, tuples and non-finite floats into plain JSON-safe Python values."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return jsonable(value.item())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    raise TypeError(f"details value of type {type(value).__name__} is not JSON-serialisable")


@dataclass(frozen=True, eq=False)
class TheoryResult:
    """Outcome of one theorem harness.

    ``passed`` means "the harness shows what the theory predicts", computed from ``measured`` and
    ``bound`` by the rule written in ``comparison``. ``source_tag`` says whether the statement is the
    paper's claim or safekd's reconstruction (see the Theory page of the documentation).
    """

    name: str
    claim: str
    source_tag: SourceTag
    assumptions: tuple[str, ...]
    measured: float
    bound: float
    comparison: str
    passed: bool
    message: str
    reference: str
    seed: int
    details: dict[str, Any] = field(default_factory=dict)
    figure: Figure | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.source_tag not in SOURCE_TAGS:
            raise ValueError(f"source_tag must be one of {SOURCE_TAGS}, got {self.source_tag!r}")
        object.__setattr__(self, "assumptions", tuple(self.assumptions))
        object.__setattr__(self, "measured", float(self.measured))
        object.__setattr__(self, "bound", float(self.bound))
        object.__setattr__(self, "passed", bool(self.passed))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary of every field except the figure (``has_figure`` says whether one exists)."""
        return {
            "name": self.name,
            "claim": self.claim,
            "source_tag": self.source_tag,
            "assumptions": list(self.assumptions),
            "measured": jsonable(self.measured),
            "bound": jsonable(self.bound),
            "comparison": self.comparison,
            "passed": self.passed,
            "message": self.message,
            "reference": self.reference,
            "seed": self.seed,
            "details": jsonable(self.details),
            "has_figure": self.figure is not None,
        }

    def save_plot(self, path: str | Path) -> Path:
        """Write the harness figure to ``path`` (format from the suffix) and return the path."""
        if self.figure is None:
            raise ValueError(f"result {self.name!r} has no figure (the harness ran with plot=False)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(path, dpi=110, bbox_inches="tight")
        return path

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"[{status}] {self.name} ({self.source_tag}): {self.message}"
