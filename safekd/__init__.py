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

from safekd import _aliases

_aliases.install()  # the module paths of the flat layout (safekd.distiller, safekd.weighting.token, ...)

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # signals, weighting, composition
    "Signals": "safekd.targets.signals",
    "compose": "safekd.targets.weighting",
    "Composition": "safekd.targets.weighting",
    "WeightOperator": "safekd.targets.weighting",
    # pooling and divergences
    "linear_pool": "safekd.targets.pooling",
    "geometric_pool": "safekd.targets.pooling",
    "tempered_pool": "safekd.targets.pooling",
    "power_mean_pool": "safekd.targets.pooling",
    "LinearPool": "safekd.targets.pooling",
    "GeometricPool": "safekd.targets.pooling",
    "TemperedPool": "safekd.targets.pooling",
    "PowerMeanPool": "safekd.targets.pooling",
    "forward_kl": "safekd.targets.divergences",
    "reverse_kl": "safekd.targets.divergences",
    "generalized_jsd": "safekd.targets.divergences",
    "skew_kl": "safekd.targets.divergences",
    "tvd": "safekd.targets.divergences",
    "Divergence": "safekd.targets.divergences",
    # axiom checker
    "check_axioms": "safekd.targets.axioms",
    "check_pool": "safekd.targets.axioms",
    # constraints and spec
    "cap": "safekd.spec.constraints",
    "floor": "safekd.spec.constraints",
    "group_cap": "safekd.spec.constraints",
    "exclude": "safekd.spec.constraints",
    "unsafe_mass": "safekd.spec.constraints",
    "safety_order": "safekd.spec.constraints",
    "unsafe_rate": "safekd.spec.constraints",
    "kl_to": "safekd.spec.constraints",
    "retain": "safekd.spec.constraints",
    "metric": "safekd.spec.constraints",
    "min_entropy": "safekd.spec.constraints",
    "kl_ball": "safekd.spec.constraints",
    "stability": "safekd.spec.constraints",
    "convex": "safekd.spec.constraints",
    "UnsafeSet": "safekd.spec.unsafe",
    "Spec": "safekd.spec.document",
    "TeacherSpec": "safekd.spec.document",
    "load_document": "safekd.spec.document",
    "SpecError": "safekd.spec.document",
    "load_spec": "safekd.spec.document",
    "DualSpec": "safekd.spec.document",
    "ChecksSpec": "safekd.spec.document",
    # language-model teachers: vocabularies, sparse top-k caches, derived teachers
    "LogitsOf": "safekd.integrations.base",
    "MappedTeacher": "safekd.targets.vocab",
    "VocabMap": "safekd.targets.vocab",
    "build_vocab_map": "safekd.targets.vocab",
    "SparseTeachers": "safekd.targets.sparse",
    "topk_logprobs": "safekd.targets.sparse",
    "StudentHidden": "safekd.targets.head",
    "DerivedTeacher": "safekd.targets.teachers",
    "derived": "safekd.targets.teachers",
    "cache_teachers": "safekd.targets.cache",
    "TeacherCache": "safekd.targets.cache",
    # training
    "SafeDistiller": "safekd.training.distiller",
    "StepRecord": "safekd.training.distiller",
    "Targets": "safekd.training.distiller",
    "NonFiniteError": "safekd.training.distiller",
    "save_checkpoint": "safekd.training.checkpoint",
    "load_checkpoint": "safekd.training.checkpoint",
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
