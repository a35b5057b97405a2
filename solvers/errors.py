"""Exception types of the :mod:`solvers` package (kept in one small module, as cvxpy does)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - import for annotations only
    from solvers.results import DiagnosisResult

__all__ = ["SolverError", "InfeasibleError"]


class SolverError(RuntimeError):
    """A numerical back end failed (names the solver and its own status text)."""


class InfeasibleError(ValueError):
    """The feasible set is empty where a caller demands feasibility.

    The message names a minimal conflicting subset of the named constraints; ``diagnosis``
    carries the full :class:`~solvers.results.DiagnosisResult`.
    """

    def __init__(self, message: str, diagnosis: "DiagnosisResult | None" = None) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis
