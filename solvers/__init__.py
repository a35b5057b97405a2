"""Constrained-optimisation engine over the probability simplex (knows nothing of distillation).

``FeasibleSet`` describes {w ∈ Δ_K : lower ≤ w ≤ upper, A w ≤ b}; ``project`` is the exact batched
projection; ``reference`` is the cvxpy oracle; ``diagnose`` explains empty sets; ``multipliers`` holds dual
update rules for Lagrangian methods. ``reference`` is imported on first use (cvxpy takes ~1 s to import).
"""
import importlib
from typing import Any

from solvers import multipliers
from solvers.diagnosis import diagnose, require_feasible
from solvers.errors import InfeasibleError, SolverError
from solvers.projection import project
from solvers.results import DiagnosisResult, ProjectionResult, Status
from solvers.sets import FeasibleSet

__all__ = [
    "FeasibleSet",
    "project",
    "diagnose",
    "require_feasible",
    "InfeasibleError",
    "SolverError",
    "Status",
    "ProjectionResult",
    "DiagnosisResult",
    "reference",
    "multipliers",
]


def __getattr__(name: str) -> Any:
    if name == "reference":
        return importlib.import_module("solvers.reference")
    raise AttributeError(f"module 'solvers' has no attribute {name!r}")
