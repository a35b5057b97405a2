"""Registry of theorem harnesses: ``HARNESSES[name](**kw) -> TheoryResult`` and ``run(name, **kw)``."""
from __future__ import annotations

import logging
from collections.abc import Callable

from safekd.theory.composition import composition
from safekd.theory.convergence import (
    convex_realizable,
    mlp_stationarity,
    nonconvex_counterexample,
    strongly_convex_rate,
)
from safekd.theory.recursion import recursive_distillation
from safekd.theory.result import TheoryResult
from safekd.theory.safety import safety_preservation
from safekd.theory.shift import distribution_shift
from safekd.theory.stability import damped_fixed_point, perturbation_bounds

logger = logging.getLogger(__name__)

HARNESSES: dict[str, Callable[..., TheoryResult]] = {
    "convergence-convex": convex_realizable,
    "convergence-rate": strongly_convex_rate,
    "convergence-nonconvex": nonconvex_counterexample,
    "convergence-mlp": mlp_stationarity,
    "stability-perturbation": perturbation_bounds,
    "stability-fixed-point": damped_fixed_point,
    "safety-preservation": safety_preservation,
    "composition": composition,
    "distribution-shift": distribution_shift,
    "recursive": recursive_distillation,
}


def run(name: str, **kwargs) -> TheoryResult:
    """Run the harness registered as ``name`` with keyword knobs (``seed``, sizes, ``plot``...)."""
    if name not in HARNESSES:
        raise ValueError(f"unknown theory harness {name!r}; available: {', '.join(HARNESSES)}")
    result = HARNESSES[name](**kwargs)
    logger.info("%s", result)
    return result
