"""Constrained-optimisation engine over the probability simplex (knows nothing of distillation).

``FeasibleSet`` describes {w ∈ Δ_K : lower ≤ w ≤ upper, A w ≤ b}; ``project`` is the exact batched
projection; ``reference`` is the cvxpy oracle; ``diagnose`` explains empty sets; ``multipliers`` holds dual
update rules for Lagrangian methods.
"""
from solvers import multipliers, reference
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
