"""safekd: safety-constrained multi-teacher knowledge distillation.

Teacher weights at token / task / context scale are composed by normalised product, projected onto the
simplex ∩ a declared safety set (``solvers.project``), pooled into a target the student is distilled to,
while student-side constraints are enforced by a primal–dual Lagrangian and checked by held-out audits.

Public names are imported lazily, so ``import safekd`` stays cheap and never imports optional
dependencies (transformers, lightning) or the cvxpy reference path until they are used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # signals, weighting, composition
    "Signals": "safekd.signals",
    "compose": "safekd.weighting",
    "Composition": "safekd.weighting",
    "WeightOperator": "safekd.weighting",
    # pooling and divergences
    "linear_pool": "safekd.pooling",
    "geometric_pool": "safekd.pooling",
    "tempered_pool": "safekd.pooling",
    "power_mean_pool": "safekd.pooling",
    "LinearPool": "safekd.pooling",
    "GeometricPool": "safekd.pooling",
    "TemperedPool": "safekd.pooling",
    "PowerMeanPool": "safekd.pooling",
    "forward_kl": "safekd.divergences",
    "reverse_kl": "safekd.divergences",
    "generalized_jsd": "safekd.divergences",
    "skew_kl": "safekd.divergences",
    "tvd": "safekd.divergences",
    "Divergence": "safekd.divergences",
    # axiom checker
    "check_axioms": "safekd.axioms",
    "check_pool": "safekd.axioms",
    # constraints and spec
    "cap": "safekd.constraints",
    "floor": "safekd.constraints",
    "group_cap": "safekd.constraints",
    "exclude": "safekd.constraints",
    "unsafe_mass": "safekd.constraints",
    "safety_order": "safekd.constraints",
    "unsafe_rate": "safekd.constraints",
    "kl_to": "safekd.constraints",
    "retain": "safekd.constraints",
    "metric": "safekd.constraints",
    "min_entropy": "safekd.constraints",
    "kl_ball": "safekd.constraints",
    "stability": "safekd.constraints",
    "convex": "safekd.constraints",
    "UnsafeSet": "safekd.unsafe",
    "Spec": "safekd.spec",
    "TeacherSpec": "safekd.spec",
    "load_document": "safekd.spec",
    "SpecError": "safekd.spec",
    "load_spec": "safekd.spec",
    "DualSpec": "safekd.spec",
    "ChecksSpec": "safekd.spec",
    # language-model teachers: vocabularies, sparse top-k caches, derived teachers
    "LogitsOf": "safekd.integrations.base",
    "MappedTeacher": "safekd.vocab",
    "VocabMap": "safekd.vocab",
    "build_vocab_map": "safekd.vocab",
    "SparseTeachers": "safekd.sparse",
    "topk_logprobs": "safekd.sparse",
    "StudentHidden": "safekd.head",
    "DerivedTeacher": "safekd.teachers",
    "derived": "safekd.teachers",
    "cache_teachers": "safekd.cache",
    "TeacherCache": "safekd.cache",
    # training
    "SafeDistiller": "safekd.distiller",
    "StepRecord": "safekd.distiller",
    "Targets": "safekd.distiller",
    "NonFiniteError": "safekd.distiller",
    "save_checkpoint": "safekd.checkpoint",
    "load_checkpoint": "safekd.checkpoint",
    # audits
    "audit": "safekd.auditing",
    "AuditReport": "safekd.auditing",
    "write_report": "safekd.auditing",
    "plan_audit": "safekd.auditing",
    "ConstraintMonitor": "safekd.auditing",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'safekd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
