"""Exception types of the :mod:`solvers` package (kept in one small module, as cvxpy does)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover - import for annotations only
    from solvers.results import DiagnosisResult

__all__ = ["SolverError", "InfeasibleError", "holds"]


def holds(ok: "torch.Tensor", graph_message: str) -> bool:
    """Whether the bool scalar tensor ``ok`` (a check of tensor data) is true, for ``if not holds(...): raise``:
    ``bool(ok)`` (one host synchronisation); inside a ``torch.compile`` graph ``True`` after a device-side
    ``torch._assert_async(ok, graph_message)`` instead (no synchronisation: a failure surfaces as a RuntimeError
    naming ``graph_message`` when the graph runs, and the caller's detailed message is not built)."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, graph_message)
        return True
    return bool(ok)


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
