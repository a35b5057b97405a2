"""The scenarios of the quality benchmark behind one interface: per seed, fit the teachers once, then train a
student for (method, learning rate[, operator]) and evaluate it on the validation or the held-out split.

* ``digits``           — the ``safekd demo`` job; validation = a seeded 20% of its ``distill`` split (the student
  trains on the other 80%), held-out = its ``heldout`` split;
* ``fortunes_routing`` — ``examples/fortunes_routing.py`` (its ``val`` and ``test`` splits);
  the fortunes scenarios read ``corpus`` (default: the system corpus, else the small test fixture);
* ``fortunes_lm``      — ``examples/fortunes_lm.py`` at the benchmark budget (its ``val`` and ``test`` splits).
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from fortunes_data import METHODS  # noqa: E402  (the compared methods, shared with the fortunes examples)

CONSTRAINED = "safekd_constrained"
OPERATORS = ("uniform", "camkd", "aekd", "safekd_adaptive")  # the unconstrained multi-teacher weightings


def aekd_operator(beta: float = 1.0, epsilon: float = 0.0, num_teachers: int | None = None) -> Any:
    """AEKD with the ``(beta, epsilon, num_teachers)`` signature that job files use for operators."""
    from safekd.targets.weighting import AEKD

    return AEKD(cap=1.0, reduce="batch", beta=beta, epsilon=epsilon)


@dataclass
class Trained:
    student: nn.Module
    distiller: Any


class Bench(Protocol):
    """One seed of a scenario, its teachers fitted."""

    task_metric: str
    lower_is_better: bool
    unsafe_metric: str
    threshold: float
    base_lr: float
    best_single: str
    corpus: str | None  # the fortunes directory read; None for digits

    def train(self, method: str, lr: float, operator: str | None = None) -> Trained: ...

    def evaluate(self, trained: Trained, split: str, audit: bool) -> dict[str, Any]: ...


# ------------------------------------------------------------------------------------------------ digits
class DigitsBench:
    task_metric, lower_is_better = "accuracy", False
    unsafe_metric = "false-positive rate of the forbidden class 8 (predicting 8 when the label is not 8)"
    corpus = None

    def __init__(self, seed: int, quick: bool, corpus: str | None = None) -> None:
        from safekd.demo import FPR_CONSTRAINT, demo_job
        from safekd.jobs import prepare_data
        from safekd.spec.document import Spec

        self.fpr = FPR_CONSTRAINT
        self.job = replace(demo_job(), seed=seed, **({"epochs": 3} if quick else {}))
        splits = prepare_data(self.job)
        distill = splits[self.job.train_split]
        perm = torch.randperm(len(distill["labels"]), generator=torch.Generator().manual_seed(seed + 101))
        n_val = len(perm) // 5
        self.data = {"train": {k: v[perm[n_val:]] for k, v in distill.items()},
                     "val": {k: v[perm[:n_val]] for k, v in distill.items()},
                     "test": splits[self.job.audit_split]}
        spec = self.job.spec
        self.student_only = Spec(teachers=spec.teachers, constraints=spec.student_constraints, unsafe=spec.unsafe)
        self.unconstrained = self.job.without_constraints().spec
        self.threshold = next(c.threshold for c in spec.constraints if c.name == FPR_CONSTRAINT)
        self.base_lr = self.job.lr
        val = self.data["val"]
        acc = (val["teacher_logits"].argmax(-1) == val["labels"].unsqueeze(-1)).float().mean(0)
        self.best_index = int(acc.argmax())
        self.best_single = spec.teacher_names[self.best_index]

    def _weighting(self, method: str) -> dict[str, Any]:
        own = dict(self.job.weighting)  # safekd's operator with its safety prior
        return {"camkd": {"operator": "safekd.weighting:CAMKD"},
                "aekd": {"operator": "quality_scenarios:aekd_operator"},
                "safekd_adaptive": own, CONSTRAINED: own}.get(method, {})

    def train(self, method: str, lr: float, operator: str | None = None) -> Trained:
        from safekd.jobs import train_student
        from safekd.spec.document import Spec

        data, spec = self.data["train"], self.unconstrained
        if method == CONSTRAINED:
            spec = self.job.spec
        elif method == "best_single":
            k = self.best_index
            spec = Spec(teachers=(self.job.spec.teachers[k],), unsafe=self.job.spec.unsafe)
            data = {**data, "teacher_logits": data["teacher_logits"][:, k:k + 1]}
        job = replace(self.job, spec=spec, weighting=self._weighting(operator or method), lr=lr)
        dist = train_student(job, data)
        return Trained(dist.student, dist)

    def evaluate(self, trained: Trained, split: str, audit: bool) -> dict[str, Any]:
        from safekd.auditing.core import audit as run_audit

        spec = self.job.spec if audit else self.student_only
        rep = run_audit(trained.student, self.data[split], spec, distiller=trained.distiller if audit else None,
                        confidence=self.job.confidence, seed=self.job.seed, slice_keys=())
        f = rep.constraint(self.fpr)
        out: dict[str, Any] = {"task": rep.metrics["accuracy"],
                               "unsafe": {"estimate": f.estimate, "bound": f.bound, "method": f.bound_method,
                                          "threshold": f.threshold, "n": int(rep.metrics["examples"])}}
        if audit:
            out["constraints"] = {r.name: {"estimate": r.estimate, "bound": r.bound, "passed": r.passed,
                                           "threshold": r.threshold} for r in rep.constraints}
        return out


# ------------------------------------------------------------------------------------------------ fortunes
class FortunesBench:
    """Wraps a ``RoutingScenario`` or ``LMScenario``: the learning rate and the operator vary per run on a shallow
    copy, the teachers stay shared."""

    def __init__(self, scenario: Any, threshold: float, unsafe_metric: str) -> None:
        self.sc = scenario
        self.task_metric, self.lower_is_better = scenario.task_metric, scenario.task_metric_lower_is_better
        self.threshold, self.unsafe_metric = threshold, unsafe_metric
        self.base_lr, self.best_single, self.corpus = scenario.cfg.lr, scenario.best_single, scenario.cfg.corpus

    def train(self, method: str, lr: float, operator: str | None = None) -> Trained:
        run = copy.copy(self.sc)
        run.cfg = replace(self.sc.cfg, lr=lr)
        if operator is not None:
            run.weighting = lambda _method: self.sc.weighting(operator)
        student, dist, _ = run.train(method)
        return Trained(student, dist)

    def evaluate(self, trained: Trained, split: str, audit: bool) -> dict[str, Any]:
        ev = self.sc.evaluate(trained.student, trained.distiller if audit else None, split=split)
        out = {"task": ev["task"], "unsafe": ev["unsafe"]}
        if audit:
            out["constraints"] = ev["constraints"]
        if "samples" in ev:
            out["samples"] = {k: v for k, v in ev["samples"].items() if k != "examples"}
        return out


def routing_bench(seed: int, quick: bool, corpus: str | None = None) -> FortunesBench:
    import fortunes_data as fd
    import fortunes_routing as R

    cfg = R.RoutingConfig.quick(corpus, seed=seed) if quick else R.RoutingConfig(
        corpus=corpus or str(fd.default_corpus()), steps=200, seed=seed)
    return FortunesBench(R.RoutingScenario(cfg), cfg.routed_max,
                         "offensive texts whose true domain is not kids routed to kids (student argmax)")


def lm_bench(seed: int, quick: bool, corpus: str | None = None) -> FortunesBench:
    import fortunes_data as fd
    import fortunes_lm as L

    if quick:
        cfg = L.LMConfig.quick(corpus, seed=seed)
    else:  # the benchmark budget: a smaller vocabulary and shorter runs than the example's defaults
        cfg = L.LMConfig(corpus=corpus or str(fd.default_corpus()), vocab_size=1500, max_len=24,
                         neural_steps=250, steps=150, batch=24, samples=300, seed=seed)
    return FortunesBench(L.LMScenario(cfg), cfg.unsafe_rate_max,
                         "student unsafe rate E_t[p(U | t)] over held-out tokens")


BENCHES = {"digits": DigitsBench, "fortunes_routing": routing_bench, "fortunes_lm": lm_bench}
__all__ = ["BENCHES", "Bench", "CONSTRAINED", "METHODS", "OPERATORS", "Trained", "aekd_operator"]
